"""``network.json``: what ``medledger network up`` created, as typed values.

The file is on disk, so it is read as hostile: :func:`parse_network` accepts
exactly the shape :func:`dump_network` writes and refuses anything else with
an :class:`~medledger.core.errors.InvalidInput` naming the file and the field.
What is checked, and why it matters to the code that acts on the file:

* every key present, no unknown key, no duplicate key, no ``NaN``;
* institution and NATS directory names are one plain path component
  (``network down`` signals the PIDs recorded under them: ``../..`` or an
  absolute path would point it elsewhere);
* ports are integers 1..65535, all different; every URL is the one the port
  implies, on ``127.0.0.1`` (``status`` polls them); a node's ``tls_cert``
  (the one certificate its clients trust) is ``<dir>/tls.crt`` by an absolute path;
* API tokens and the PostgreSQL password use a small alphabet (the password
  is spliced into a libpq connection string, the tokens into HTTP headers);
* ordering, store, stream replicas, NATS servers and the PostgreSQL entry
  agree with each other (``solo`` has no NATS servers, ``sqlite`` no
  PostgreSQL, ``1 <= replicas <= servers``).

Where the PostgreSQL cluster may live depends on the network directory, so
:mod:`~medledger.localnet.netproc` checks that after parsing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from medledger.core.errors import InvalidInput

__all__ = [
    "HOST",
    "MAX_NETWORK_FILE_BYTES",
    "NETWORK_FILE_VERSION",
    "ORDERINGS",
    "STORES",
    "ApiTokens",
    "InstitutionEntry",
    "NatsEntry",
    "NetworkSpec",
    "Ordering",
    "PostgresEntry",
    "Store",
    "dump_network",
    "parse_network",
]

#: Every process of a one-machine network listens here only.
HOST: Final = "127.0.0.1"
NETWORK_FILE_VERSION: Final = 1
#: A network of 32 institutions is ~10 KiB; anything this large is not ours.
MAX_NETWORK_FILE_BYTES: Final = 1 << 20
#: More than any one machine runs; bounds the work a hostile file can ask for.
_MAX_ENTRIES = 1024

Ordering: TypeAlias = Literal["solo", "jetstream"]
Store: TypeAlias = Literal["sqlite", "postgres"]
ORDERINGS: Final[tuple[Ordering, ...]] = ("solo", "jetstream")
STORES: Final[tuple[Store, ...]] = ("sqlite", "postgres")

#: One path component: no separator, no leading dot (so neither ``.`` nor ``..``).
_DIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: Directories of the network itself, which no institution may claim.
_RESERVED_DIRS = frozenset({"nats", "postgres"})
#: Bearer tokens: URL-safe base64 and separators, nothing that could end a header.
_TOKEN = re.compile(r"[A-Za-z0-9_.~+/=-]{1,256}")
#: Generated as hex: nothing that could end a ``key=value`` of a connection string.
_PASSWORD = re.compile(r"[A-Za-z0-9]{16,128}")
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiTokens:
    """The API tokens ``network up`` created for one node."""

    admin: str
    clinician: str

    def for_role(self, role: str) -> str:
        """The token of ``role`` (``admin`` or ``clinician``); :class:`InvalidInput` otherwise."""
        if role == "admin":
            return self.admin
        if role == "clinician":
            return self.clinician
        raise InvalidInput(f"network up creates no {role!r} token (admin or clinician)")


@dataclass(frozen=True, slots=True, kw_only=True)
class InstitutionEntry:
    """One institution's node: its directory under the network, API port and tokens."""

    institution: str
    name: str
    dir: str
    port: int
    tokens: ApiTokens
    #: The node's pinned TLS certificate (``<network>/<dir>/tls.crt``): what its
    #: clients trust, alone.
    tls_cert: Path

    @property
    def url(self) -> str:
        """The node's HTTPS API (FHIR, chain, peer), on loopback."""
        return f"https://{HOST}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsEntry:
    """One nats-server of the ordering cluster: ``<network>/nats/<name>/`` and its ports."""

    name: str
    client: int
    cluster: int
    http: int

    @property
    def url(self) -> str:
        """Where a JetStream client connects."""
        return f"nats://{HOST}:{self.client}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresEntry:
    """The embedded PostgreSQL cluster of a ``--store postgres`` network."""

    port: int
    password: str
    data_dir: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkSpec:
    """The whole ``network.json`` (see the module docstring for what holds)."""

    consortium: str
    ordering: Ordering
    store: Store
    replicas: int | None
    nodes: tuple[InstitutionEntry, ...]
    nats: tuple[NatsEntry, ...] = ()
    postgres: PostgresEntry | None = None

    def __post_init__(self) -> None:
        _check_spec(self)

    def node(self, institution: str) -> InstitutionEntry:
        """The entry of ``institution``; :class:`InvalidInput` if the network has none."""
        for entry in self.nodes:
            if entry.institution == institution:
                return entry
        raise InvalidInput(f"the network has no institution {institution!r}")

    def to_json(self) -> dict[str, Any]:
        """The JSON object :func:`dump_network` writes (also ``network up --json``)."""
        return {
            "version": NETWORK_FILE_VERSION,
            "consortium": self.consortium,
            "ordering": self.ordering,
            "store": self.store,
            "replicas": self.replicas,
            "nodes": [
                {
                    "institution": n.institution,
                    "name": n.name,
                    "dir": n.dir,
                    "port": n.port,
                    "url": n.url,
                    "tls_cert": str(n.tls_cert),
                    "tokens": {"admin": n.tokens.admin, "clinician": n.tokens.clinician},
                }
                for n in self.nodes
            ],
            "nats": [
                {"name": s.name, "client": s.client, "cluster": s.cluster, "http": s.http}
                for s in self.nats
            ],
            "postgres": None
            if self.postgres is None
            else {
                "port": self.postgres.port,
                "password": self.postgres.password,
                "data_dir": str(self.postgres.data_dir),
            },
        }


def dump_network(spec: NetworkSpec) -> bytes:
    """``spec`` as the bytes of ``network.json`` (indented, one trailing newline)."""
    return (json.dumps(spec.to_json(), indent=2) + "\n").encode()


def parse_network(raw: bytes | str, *, source: str = "network.json") -> NetworkSpec:
    """The network described by ``raw``; :class:`InvalidInput` naming ``source`` if malformed."""
    if len(raw) > MAX_NETWORK_FILE_BYTES:
        raise InvalidInput(f"{source}: larger than {MAX_NETWORK_FILE_BYTES} bytes")
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidInput(f"{source}: not JSON ({exc})") from None
    try:
        return _spec(data)
    except _Malformed as exc:
        raise InvalidInput(f"{source}: {exc}") from None


# -- parsing ------------------------------------------------------------------------------


class _Malformed(Exception):
    """A field that is not what ``network.json`` holds; the message names it."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(value: Any, where: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{where}: expected an object")
    missing = [k for k in keys if k not in value]
    if missing:
        raise _Malformed(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise _Malformed(f"{where}: unknown field {', '.join(map(repr, unknown))}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Malformed(f"{where}: expected a list")
    if len(value) > _MAX_ENTRIES:
        raise _Malformed(f"{where}: more than {_MAX_ENTRIES} entries")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    # bool is an int in Python, never in this file.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Malformed(f"{where}: expected an integer {low}..{high}, got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    return _int(value, where, 1, 65535)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise _Malformed(f"{where}: expected a text of 1..{_MAX_TEXT} characters")
    if not value.isprintable():
        raise _Malformed(f"{where}: control characters")
    return value


def _matching(value: Any, where: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _Malformed(f"{where}: expected {what}")
    return value


def _dir_name(value: Any, where: str) -> str:
    return _matching(value, where, _DIR_NAME, "one plain directory name ([A-Za-z0-9_.-])")


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _Malformed(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _tokens(value: Any, where: str) -> ApiTokens:
    data = _object(value, where, ("admin", "clinician"))
    what = "an API token"
    return ApiTokens(
        admin=_matching(data["admin"], f"{where}.admin", _TOKEN, what),
        clinician=_matching(data["clinician"], f"{where}.clinician", _TOKEN, what),
    )


def _node(value: Any, where: str) -> InstitutionEntry:
    data = _object(
        value, where, ("institution", "name", "dir", "port", "url", "tls_cert", "tokens")
    )
    directory = _dir_name(data["dir"], f"{where}.dir")
    cert = Path(_text(data["tls_cert"], f"{where}.tls_cert"))
    if not cert.is_absolute() or ".." in cert.parts:
        raise _Malformed(f"{where}.tls_cert: expected an absolute path without '..'")
    entry = InstitutionEntry(
        institution=_dir_name(data["institution"], f"{where}.institution"),
        name=_text(data["name"], f"{where}.name"),
        dir=directory,
        port=_port(data["port"], f"{where}.port"),
        tokens=_tokens(data["tokens"], f"{where}.tokens"),
        tls_cert=cert,
    )
    if data["url"] != entry.url:
        raise _Malformed(f"{where}.url: expected {entry.url!r} (from its port)")
    return entry


def _nats(value: Any, where: str) -> NatsEntry:
    data = _object(value, where, ("name", "client", "cluster", "http"))
    return NatsEntry(
        name=_dir_name(data["name"], f"{where}.name"),
        client=_port(data["client"], f"{where}.client"),
        cluster=_port(data["cluster"], f"{where}.cluster"),
        http=_port(data["http"], f"{where}.http"),
    )


def _postgres(value: Any, where: str) -> PostgresEntry | None:
    if value is None:
        return None
    data = _object(value, where, ("port", "password", "data_dir"))
    data_dir = _text(data["data_dir"], f"{where}.data_dir")
    if not Path(data_dir).is_absolute() or ".." in Path(data_dir).parts:
        raise _Malformed(f"{where}.data_dir: expected an absolute path without '..'")
    return PostgresEntry(
        port=_port(data["port"], f"{where}.port"),
        password=_matching(data["password"], f"{where}.password", _PASSWORD, "16..128 [A-Za-z0-9]"),
        data_dir=Path(data_dir),
    )


def _spec(value: Any) -> NetworkSpec:
    keys = ("version", "consortium", "ordering", "store", "replicas", "nodes", "nats", "postgres")
    if isinstance(value, dict) and value.get("version") != NETWORK_FILE_VERSION:
        # Checked first: a future file gets "unknown version", not a list of field errors.
        raise _Malformed(f"unknown version {value.get('version')!r}")
    data = _object(value, "the network", keys)
    ordering = _choice(data["ordering"], "ordering", ORDERINGS)
    store = _choice(data["store"], "store", STORES)
    replicas = data["replicas"]
    if replicas is not None:
        replicas = _int(replicas, "replicas", 1, _MAX_ENTRIES)
    try:
        return NetworkSpec(
            consortium=_text(data["consortium"], "consortium"),
            ordering="solo" if ordering == "solo" else "jetstream",
            store="sqlite" if store == "sqlite" else "postgres",
            replicas=replicas,
            nodes=tuple(
                _node(n, f"nodes[{i}]") for i, n in enumerate(_list(data["nodes"], "nodes"))
            ),
            nats=tuple(_nats(n, f"nats[{i}]") for i, n in enumerate(_list(data["nats"], "nats"))),
            postgres=_postgres(data["postgres"], "postgres"),
        )
    except InvalidInput as exc:  # from NetworkSpec's own checks
        raise _Malformed(str(exc)) from None


def _check_spec(spec: NetworkSpec) -> None:
    """The rules that relate fields to each other; :class:`InvalidInput` if one is broken."""
    if not spec.nodes:
        raise InvalidInput("a network needs at least one institution")
    for field, values in (
        ("institution", [n.institution for n in spec.nodes]),
        ("dir", [n.dir for n in spec.nodes]),
        ("nats name", [s.name for s in spec.nats]),
    ):
        if len(set(values)) != len(values):
            raise InvalidInput(f"two entries share one {field}")
    taken = _RESERVED_DIRS & {n.dir for n in spec.nodes}
    if taken:
        raise InvalidInput(f"institution dir {sorted(taken)[0]!r} is the network's own")
    for i, node in enumerate(spec.nodes):
        # Clients trust this file alone: it must be the node's own, in its directory.
        if node.tls_cert.parts[-2:] != (node.dir, "tls.crt"):
            raise InvalidInput(f"nodes[{i}].tls_cert: expected a path ending in {node.dir}/tls.crt")
    ports = [n.port for n in spec.nodes]
    ports += [p for s in spec.nats for p in (s.client, s.cluster, s.http)]
    ports += [spec.postgres.port] if spec.postgres is not None else []
    if len(set(ports)) != len(ports):
        raise InvalidInput("two processes share one port")
    if spec.ordering == "solo" and (spec.nats or spec.replicas is not None):
        raise InvalidInput("solo ordering has no NATS servers and no stream replicas")
    if spec.ordering == "jetstream":
        if not spec.nats:
            raise InvalidInput("jetstream ordering needs at least one NATS server")
        if spec.replicas is None or not 1 <= spec.replicas <= len(spec.nats):
            raise InvalidInput(
                f"replicas must be between 1 and {len(spec.nats)} (the NATS servers)"
            )
    if (spec.store == "postgres") != (spec.postgres is not None):
        raise InvalidInput("a PostgreSQL entry exactly when the store is postgres")
