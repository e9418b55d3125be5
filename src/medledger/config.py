"""Node configuration: ``node.toml`` in the node directory, overridable by environment.

::

    [node]
    name = "St. Mary Hospital"      # display name (not PHI)
    institution = "st-mary"        # stable id used on chains
    chain = "private:st-mary"
    advertise = "https://st-mary.example.org:8700"   # optional: where other members
                                   # reach this node (genesis peer_url; node start binds it)

    [sequencer]
    max_txs = 4096
    max_wait_ms = 0.0

    [keys]
    signing_fingerprint = "…"      # hex SHA-256 of the public key's DER SPKI
    signing_public_key = "-----BEGIN PUBLIC KEY-----…"

    [storage]                      # optional; absent = the embedded default
    store = "postgres"             # "sqlite" (default) | "postgres"
    dsn = "host=db1 dbname=medledger user=st_mary"   # never a password
    blobs = "file"                 # "file" (default) | "postgres"

    [consortium]                   # optional; how `node start` reaches the ordering service
    ordering = "solo"              # "solo": one order file shared by the nodes of one machine
    order_file = "../order.db"     #   relative to the node directory
    # ordering = "jetstream"       # "jetstream": a NATS JetStream stream
    # nats_urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    # stream = "CONSORTIUM"
    # subject = "consortium.order"
    # replicas = 3                 # stream replicas, at most the NATS cluster size
    # nats_ping_interval = 1       # s between pings; a server that misses
    # nats_max_outstanding_pings = 3   # this many more is left as hung (~4 s)
    # nats_seed = "nats.nk"        # the member's NKey: TLS to NATS, verified against
    #                              #   the genesis members' certificates
    anchor = true                  # anchor the private chain on the consortium

Environment: ``MEDLEDGER_MAX_TXS`` and ``MEDLEDGER_MAX_WAIT_MS`` override the
sequencer settings; ``MEDLEDGER_PASSPHRASE`` supplies the keystore passphrase;
``MEDLEDGER_STORE``, ``MEDLEDGER_DSN`` and ``MEDLEDGER_BLOBS`` override
``[storage]``. A PostgreSQL password comes from ``MEDLEDGER_DSN``,
``PGPASSWORD`` or ``~/.pgpass``: ``node.toml`` never stores one.
``MEDLEDGER_ORDERING``, ``MEDLEDGER_ORDER_FILE``, ``MEDLEDGER_NATS_URLS``
(comma-separated), ``MEDLEDGER_NATS_SEED`` and ``MEDLEDGER_STREAM_REPLICAS``
override ``[consortium]``
(``MEDLEDGER_ORDERING`` alone configures a node without the section).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from medledger.core.errors import InvalidInput, NotFound
from medledger.core.keys import VerifyingKey
from medledger.ledger.sequencer_config import SequencerConfig
from medledger.storage.keystore import atomic_write

__all__ = [
    "CONFIG_FILE",
    "ConsortiumConfig",
    "NodeConfig",
    "NodePaths",
    "StorageConfig",
    "institution_id",
    "load_config",
    "parse_advertise",
    "public_base_url",
]

CONFIG_FILE = "node.toml"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: A DNS name, an IPv4 address or an IPv6 literal (``urlsplit`` strips its brackets).
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}")


def institution_id(text: str) -> str:
    """A chain-safe id: lowercase letters, digits and dashes, at most 63 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not _ID.match(slug):
        raise InvalidInput(f"cannot derive an institution id from {text!r}; pass --id")
    return slug


def parse_advertise(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an advertised node URL, or :class:`InvalidInput`.

    The URL other members and clients reach the node at: ``http`` or
    ``https``, a host name or IP address, an explicit port, and nothing else
    (no user, path, query or fragment), because it is spliced into request
    URLs (``<url>/peer/v1/...``) and recorded in the genesis as ``peer_url``.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or not 1 <= port <= 65535
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not _HOST.fullmatch(parts.hostname)
    ):
        raise InvalidInput(
            f"advertised address {url!r} must look like https://HOST:PORT (http or https, "
            "a host name or IP address, a port, nothing else)"
        )
    return parts.scheme, parts.hostname, port


#: Listening addresses that name no one host: a URL built from them reaches nobody.
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (recognized, not bound)


def public_base_url(
    advertise: str, *, scheme: str = "https", host: str = "", port: int = 0
) -> str | None:
    """Where clients reach this node: its public base URL (``scheme://host:port``), or ``None``.

    ``advertise`` (node.toml, ``node init --advertise``) when set; else the
    address the node listens on (``node start --host/--port``, ``scheme``
    ``https`` or ``http`` for ``--plain-http``), unless that is a wildcard
    address, which names no host a client could use. The node says this URL
    wherever it must name itself to a client (the SMART authorization server's
    issuer, endpoints, ``aud`` and the portal's redirect URI): never the
    request's ``Host`` header, which the client chooses.
    """
    if advertise:
        scheme, host, port = parse_advertise(advertise)
    elif host in _WILDCARDS:
        return None
    # As a browser writes an origin (``location.origin``): lowercase, brackets around an
    # IPv6 address, no default port. The portal compares the two.
    bare = host.strip("[]").lower()
    netloc = f"[{bare}]" if ":" in bare else bare
    if port != {"https": 443, "http": 80}.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePaths:
    """Where a node keeps its files, all inside one directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def keystore(self) -> Path:
        return self.root / "keystore.json"

    @property
    def chain_db(self) -> Path:
        return self.root / "chain.db"

    @property
    def records_db(self) -> Path:
        return self.root / "records.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def exports(self) -> Path:
        """Bulk export jobs: their state and encrypted NDJSON files (``services.bulk_export``)."""
        return self.root / "exports"

    @property
    def genesis(self) -> Path:
        return self.root / "genesis.json"

    @property
    def consortium_db(self) -> Path:
        return self.root / "consortium.db"

    @property
    def tls_cert(self) -> Path:
        """The node's self-signed TLS certificate (PEM), pinned by the consortium."""
        return self.root / "tls.crt"

    @property
    def tls_key(self) -> Path:
        """The node's TLS private key (PEM, owner-only)."""
        return self.root / "tls.key"

    @property
    def tls_next_cert(self) -> Path:
        """A renewed certificate waiting for its ``member.tls`` to be final (``tls-cert --renew``)."""
        return self.root / "tls.next.crt"

    @property
    def tls_next_key(self) -> Path:
        """The key of :attr:`tls_next_cert` (owner-only)."""
        return self.root / "tls.next.key"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """Which storage adapters a node uses: ``store`` sqlite|postgres, ``blobs`` file|postgres.

    ``dsn`` (PostgreSQL only) is a libpq connection string; its password, if
    any, is used but never written to ``node.toml``.
    """

    store: str = "sqlite"
    #: May carry a password: never in a repr.
    dsn: str = field(default="", repr=False)
    blobs: str = "file"

    def __post_init__(self) -> None:
        if self.store not in ("sqlite", "postgres"):
            raise InvalidInput(
                f"[storage] store must be 'sqlite' or 'postgres', not {self.store!r}"
            )
        if self.blobs not in ("file", "postgres"):
            raise InvalidInput(f"[storage] blobs must be 'file' or 'postgres', not {self.blobs!r}")
        if (self.store == "postgres" or self.blobs == "postgres") and not self.dsn:
            raise InvalidInput("[storage] PostgreSQL needs a dsn (or MEDLEDGER_DSN)")

    @classmethod
    def from_env(
        cls, section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> StorageConfig:
        """``[storage]`` values (or defaults) overridden by ``MEDLEDGER_STORE/_DSN/_BLOBS``."""
        env = os.environ if env is None else env
        sec = section or {}
        return cls(
            store=str(env.get("MEDLEDGER_STORE") or sec.get("store", "sqlite")),
            dsn=str(env.get("MEDLEDGER_DSN") or sec.get("dsn", "")),
            blobs=str(env.get("MEDLEDGER_BLOBS") or sec.get("blobs", "file")),
        )

    def to_toml(self) -> dict[str, str]:
        doc = {"store": self.store, "blobs": self.blobs}
        if self.dsn:
            from medledger.storage.postgres.connection import strip_password

            doc["dsn"] = strip_password(self.dsn)
        return doc


_ORDERINGS = ("solo", "jetstream")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsortiumConfig:
    """How a node reaches the consortium's ordering service (``[consortium]``).

    ``solo``: ``order_file``, the SQLite order every node of this machine opens
    (relative paths are relative to the node directory). ``jetstream``:
    ``nats_urls`` of the NATS cluster, the ``stream`` and its ``subject``, and
    ``replicas`` (at most the cluster size); ``nats_ping_interval`` (whole
    seconds) and ``nats_max_outstanding_pings``: how soon a hung NATS server is
    left (after about interval * (pings + 1) seconds). ``anchor``: whether the
    node anchors its private chain.
    """

    ordering: str = "solo"
    order_file: str = "../order.db"
    nats_urls: tuple[str, ...] = ()
    stream: str = "CONSORTIUM"
    subject: str = "consortium.order"
    replicas: int = 3
    nats_ping_interval: int = 1
    nats_max_outstanding_pings: int = 3
    #: The member's NKey seed file (relative to the node directory). Set: NATS over
    #: TLS, servers verified against the genesis members' certificates, and this key.
    nats_seed: str = ""
    anchor: bool = True

    def __post_init__(self) -> None:
        if self.ordering not in _ORDERINGS:
            raise InvalidInput(
                f"[consortium] ordering must be 'solo' or 'jetstream', not {self.ordering!r}"
            )
        if self.ordering == "solo" and not self.order_file:
            raise InvalidInput("[consortium] solo ordering needs an order_file")
        if self.ordering == "jetstream" and not self.nats_urls:
            raise InvalidInput("[consortium] jetstream ordering needs nats_urls")
        if not 1 <= self.replicas <= 5:
            raise InvalidInput("[consortium] replicas must be between 1 and 5")
        if not 1 <= self.nats_ping_interval <= 120:
            raise InvalidInput("[consortium] nats_ping_interval must be 1 to 120 seconds")
        if not 1 <= self.nats_max_outstanding_pings <= 10:
            raise InvalidInput("[consortium] nats_max_outstanding_pings must be 1 to 10")

    def order_path(self, root: Path) -> Path:
        """The solo order file, resolved against the node directory ``root``."""
        path = Path(self.order_file)
        return path if path.is_absolute() else root / path

    @classmethod
    def from_env(
        cls, section: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
    ) -> ConsortiumConfig | None:
        """``[consortium]`` overridden by ``MEDLEDGER_ORDERING`` and friends; ``None`` if neither."""
        env = os.environ if env is None else env
        if section is None and not env.get("MEDLEDGER_ORDERING"):
            return None
        sec = section or {}
        urls_env = env.get("MEDLEDGER_NATS_URLS")
        urls = (
            [u.strip() for u in urls_env.split(",") if u.strip()]
            if urls_env
            else sec.get("nats_urls", [])
        )
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidInput("[consortium] nats_urls must be a list of strings")
        anchor = sec.get("anchor", True)
        if not isinstance(anchor, bool):
            raise InvalidInput("[consortium] anchor must be true or false")
        try:
            replicas = int(env.get("MEDLEDGER_STREAM_REPLICAS") or sec.get("replicas", 3))
        except (TypeError, ValueError):
            raise InvalidInput("[consortium] replicas must be a whole number") from None
        pings = {}
        for key, default in (("nats_ping_interval", 1), ("nats_max_outstanding_pings", 3)):
            value = sec.get(key, default)
            if type(value) is not int:
                raise InvalidInput(f"[consortium] {key} must be a whole number")
            pings[key] = value
        return cls(
            ordering=str(env.get("MEDLEDGER_ORDERING") or sec.get("ordering", "solo")),
            order_file=str(env.get("MEDLEDGER_ORDER_FILE") or sec.get("order_file", "../order.db")),
            nats_urls=tuple(urls),
            stream=str(sec.get("stream", "CONSORTIUM")),
            subject=str(sec.get("subject", "consortium.order")),
            replicas=replicas,
            nats_ping_interval=pings["nats_ping_interval"],
            nats_max_outstanding_pings=pings["nats_max_outstanding_pings"],
            nats_seed=str(env.get("MEDLEDGER_NATS_SEED") or sec.get("nats_seed", "")),
            anchor=anchor,
        )

    def to_toml(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ordering": self.ordering}
        if self.ordering == "solo":
            doc["order_file"] = self.order_file
        else:
            doc.update(
                nats_urls=list(self.nats_urls),
                stream=self.stream,
                subject=self.subject,
                replicas=self.replicas,
            )
            if self.nats_seed:
                doc["nats_seed"] = self.nats_seed
            if (self.nats_ping_interval, self.nats_max_outstanding_pings) != (1, 3):
                doc.update(
                    nats_ping_interval=self.nats_ping_interval,
                    nats_max_outstanding_pings=self.nats_max_outstanding_pings,
                )
        doc["anchor"] = self.anchor
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    name: str
    institution: str
    chain: str
    sequencer: SequencerConfig
    signing_key: VerifyingKey
    storage: StorageConfig = StorageConfig()
    #: The HPKE public key other members wrap shared data keys to ("<kem>:<hex>").
    hpke_key: str = ""
    consortium: ConsortiumConfig | None = None
    #: Where other members reach this node (``parse_advertise``); empty: loopback only.
    advertise: str = ""

    def __post_init__(self) -> None:
        if self.advertise:
            parse_advertise(self.advertise)

    def to_toml(self) -> bytes:
        node: dict[str, str] = {
            "name": self.name,
            "institution": self.institution,
            "chain": self.chain,
        }
        if self.advertise:
            node["advertise"] = self.advertise
        doc: dict[str, Any] = {
            "node": node,
            "sequencer": {
                "max_txs": self.sequencer.max_txs,
                "max_wait_ms": float(self.sequencer.max_wait_ms),
            },
            "keys": {
                "signing_fingerprint": self.signing_key.fingerprint,
                "signing_public_key": self.signing_key.pem(),
                **({"hpke_public_key": self.hpke_key} if self.hpke_key else {}),
            },
        }
        if self.storage != StorageConfig():
            doc["storage"] = self.storage.to_toml()
        if self.consortium is not None:
            doc["consortium"] = self.consortium.to_toml()
        return tomli_w.dumps(doc, multiline_strings=True).encode()

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_toml(), mode=0o600)


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise InvalidInput(f"{CONFIG_FILE}: missing [{name}] section")
    return value


def _optional_section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise InvalidInput(f"{CONFIG_FILE}: [{name}] is not a section")
    return value


def load_config(root: Path, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``node.toml`` from ``root``; raise :class:`NotFound` / :class:`InvalidInput`."""
    env = os.environ if env is None else env
    path = NodePaths(root=root).config
    if not root.is_dir():
        raise NotFound(f"node directory {root} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(
            f"{root} is not a medledger node (no {CONFIG_FILE}); run 'medledger node init'"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: {exc}") from None
    node, seq, keys = _section(doc, "node"), _section(doc, "sequencer"), _section(doc, "keys")
    try:
        max_txs = int(env.get("MEDLEDGER_MAX_TXS", seq.get("max_txs", 4096)))
        max_wait = float(env.get("MEDLEDGER_MAX_WAIT_MS", seq.get("max_wait_ms", 0.0)))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"invalid sequencer setting in {path} or the environment ({exc})"
        ) from None
    try:
        key = VerifyingKey.from_pem(str(keys["signing_public_key"]))
        config = NodeConfig(
            name=str(node["name"]),
            institution=str(node["institution"]),
            chain=str(node["chain"]),
            sequencer=SequencerConfig(max_txs=max_txs, max_wait_ms=max_wait),
            signing_key=key,
            storage=StorageConfig.from_env(_optional_section(doc, "storage"), env),
            hpke_key=str(keys.get("hpke_public_key", "")),
            consortium=ConsortiumConfig.from_env(
                _optional_section(doc, "consortium") if "consortium" in doc else None, env
            ),
            advertise=str(node.get("advertise", "")),
        )
    except (KeyError, ValueError, TypeError, InvalidInput) as exc:
        raise InvalidInput(f"{path}: invalid setting ({exc})") from None
    if key.fingerprint != keys.get("signing_fingerprint"):
        raise InvalidInput(f"{path}: signing_fingerprint does not match signing_public_key")
    return config
