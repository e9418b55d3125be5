"""An institution's nats-server configuration, generated from the consortium's members. Pure.

Each institution runs one server of the consortium's JetStream cluster
(docs/deploy.md). :class:`NatsServerConfig` is everything that server's
configuration says, checked before a line is written:

* clients over TLS only, with the institution's pinned certificate, and
  cluster routes over mutual TLS verified against ``ca_file`` (the current
  members' certificates, :func:`members_pem`);
* ``authorization``: one NKey user per member with :func:`member_permissions`
  (publish to the consortium subject and its broadcast subject, read the
  stream through its own consumers; no stream create, update, delete or
  purge) and :func:`member_subscriptions` (its inboxes and the broadcast
  subject), one operator user
  who may do everything, and no one else — anonymous connections are refused;
* monitoring (``http``) on the loopback address only: it serves server
  details (connections, routes, accounts) to whoever reaches it;
* JetStream with ``sync_interval: always`` (an acknowledged message is on
  disk, not within two minutes of it).

Every value is checked (host names and ports, NKey public keys with their
checksum, member ids) and written as a quoted JSON string, so no input can
add a line or a block to the file.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medledger.core.errors import InvalidInput
from medledger.core.tls import MemberCertificate

__all__ = [
    "NatsServerConfig",
    "check_user_nkey",
    "broadcast_subject",
    "member_permissions",
    "member_subscriptions",
    "members_pem",
    "parse_host_port",
]

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
_NKEY = re.compile(r"^[A-Z2-7]{56}$")
#: NKey prefix byte of a user public key ('U').
_PREFIX_USER = 20 << 3
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def broadcast_subject(subject: str) -> str:
    """The core NATS subject of the order's broadcasts (not in the stream: it has ``subject`` only)."""
    return f"{subject}.broadcast"


def member_permissions(stream: str, subject: str) -> tuple[str, ...]:
    """The subjects a member may publish to: the consortium subject and reading the stream.

    Reading goes through consumers of its own (create, info, next, ack, delete
    its consumer); nothing here creates, updates, deletes or purges a stream
    or deletes a message, and nothing touches another stream. Broadcasts
    (votes sent beside the order) go to :func:`broadcast_subject`.
    """
    return (
        subject,
        broadcast_subject(subject),
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
    )


def member_subscriptions(subject: str) -> tuple[str, ...]:
    """The subjects a member may subscribe to: its inboxes and the order's broadcasts."""
    return ("_INBOX.>", broadcast_subject(subject))


def _crc16(data: bytes) -> int:
    # CRC-16/XMODEM, the checksum of NKey encodings (nkeys' own table-driven version).
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def check_user_nkey(text: str) -> str:
    """``text`` if it is an NKey *user* public key (``U…``, 56 characters, valid checksum)."""
    if not _NKEY.match(text) or not text.startswith("U"):
        raise InvalidInput("an NKey user public key is 56 base32 characters starting with U")
    raw = base64.b32decode(text)  # 56 characters: 35 bytes, no padding
    body, checksum = raw[:-2], int.from_bytes(raw[-2:], "little")
    if len(raw) != 35 or body[0] != _PREFIX_USER or _crc16(body) != checksum:
        raise InvalidInput(f"{text[:8]}…: not a valid NKey user public key (checksum)")
    return text


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.match(host):
        raise InvalidInput(f"{host!r} is not a host name or IP address")
    return host.lower()


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), checked."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidInput(f"{what} must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return _check_host(host), int(port_text)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def members_pem(certificates: Sequence[MemberCertificate]) -> str:
    """The ``ca_file`` text: every current member's pinned certificate, PEM."""
    if not certificates:
        raise InvalidInput("the consortium pins no TLS certificate: NATS cannot verify anyone")
    return "".join(cert.pem() for cert in certificates)


def _q(value: str) -> str:
    # NATS config strings accept JSON double-quoted strings: no value can end its line.
    return json.dumps(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsServerConfig:
    """One institution's nats-server (see the module docstring); :meth:`text` is the file."""

    server_name: str
    #: Client and cluster listening addresses, ``(host, port)``.
    listen: tuple[str, int]
    #: The other members' servers, ``(host, port)`` of their cluster listeners
    #: (none: a standalone server, no ``cluster`` block).
    routes: tuple[tuple[str, int], ...]
    cluster_listen: tuple[str, int] | None
    cert_file: str
    key_file: str
    ca_file: str
    store_dir: str
    #: Member id -> its NKey user public key (``node nats-key``), every current member.
    member_nkeys: Mapping[str, str]
    operator_nkey: str
    stream: str = "CONSORTIUM"
    subject: str = "consortium.order"
    #: The monitoring port, always on 127.0.0.1 (``None``: no monitoring endpoint).
    monitor_port: int | None = 8222
    cluster_name: str = "medledger"

    def __post_init__(self) -> None:
        if not _SERVER_NAME.match(self.server_name):
            raise InvalidInput(f"server name {self.server_name!r}: letters, digits, '-_.' only")
        for path in (self.cert_file, self.key_file, self.ca_file, self.store_dir):
            if not path.startswith("/") or any(c in path for c in "\n\r\0"):
                raise InvalidInput(f"{path!r} must be an absolute path")
        keys = [check_user_nkey(k) for k in self.member_nkeys.values()]
        keys.append(check_user_nkey(self.operator_nkey))
        if len(set(keys)) != len(keys):
            raise InvalidInput("every member and the operator need an NKey of their own")
        if self.routes and self.cluster_listen is None:
            raise InvalidInput("routes need a cluster listening address")
        if self.monitor_port is not None and not 1 <= self.monitor_port <= 65535:
            raise InvalidInput("the monitoring port must be 1..65535")
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", self.stream) or not re.match(
            r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", self.subject
        ):
            raise InvalidInput("stream and subject names: letters, digits, '-_' (and '.')")

    def _tls(self, *, verify: bool) -> list[str]:
        return [
            "  tls {",
            f"    cert_file: {_q(self.cert_file)}",
            f"    key_file: {_q(self.key_file)}",
            f"    ca_file: {_q(self.ca_file)}",
            *(["    verify: true"] if verify else []),
            "    timeout: 5",
            "  }",
        ]

    def text(self) -> str:
        """The configuration file's content."""
        allow = ", ".join(_q(s) for s in member_permissions(self.stream, self.subject))
        listen = ", ".join(_q(s) for s in member_subscriptions(self.subject))
        lines = [
            f"# nats-server of {self.server_name}: generated by 'medledger nats config';",
            "# regenerate it (do not edit) after a membership change, then reload the server.",
            f"server_name: {_q(self.server_name)}",
            f"listen: {_q(_address(*self.listen))}",
        ]
        if self.monitor_port is not None:
            lines.append("# Monitoring: this machine only (it lists connections and routes).")
            lines.append(f"http: {_q(_address('127.0.0.1', self.monitor_port))}")
        lines += [
            "jetstream {",
            f"  store_dir: {_q(self.store_dir)}",
            "  # fsync every write before it is acknowledged (the default: every 2 minutes).",
            "  sync_interval: always",
            "}",
            "# Clients: TLS only, with this member's pinned certificate.",
            *(line[2:] for line in self._tls(verify=False)),
            "# Every client authenticates with an NKey below; there is no anonymous user.",
            "authorization {",
            "  users: [",
        ]
        for member_id, nkey in sorted(self.member_nkeys.items()):
            lines.append(f"    # member {_q(member_id)}")
            lines.append(
                f"    {{ nkey: {_q(nkey)}, permissions: {{ publish: {{ allow: [{allow}] }},"
                f" subscribe: {{ allow: [{listen}] }} }} }}"
            )
        lines += [
            "    # the operator: creates and changes the stream",
            f"    {{ nkey: {_q(self.operator_nkey)} }}",
            "  ]",
            "}",
        ]
        if self.routes and self.cluster_listen is not None:
            lines += [
                "# Routes: mutual TLS, members' certificates only.",
                "cluster {",
                f"  name: {_q(self.cluster_name)}",
                f"  listen: {_q(_address(*self.cluster_listen))}",
                *self._tls(verify=True),
                "  routes: [",
                *(f"    {_q('nats-route://' + _address(*route))}" for route in self.routes),
                "  ]",
                "}",
            ]
        return "\n".join(lines) + "\n"
