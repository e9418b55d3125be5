"""TLS for a node: its key and self-signed certificate, and the ``ssl`` contexts built on them.

Every member has one TLS key (P-256, ``tls.key``, owner-only PEM) and a
self-signed certificate for it (``tls.crt``) that the consortium pins
(``core.tls``, decision 0029). Nothing here is a CA: a trust anchor is always
one member's own certificate.

* :func:`server_context` — the node's HTTPS server: its own certificate,
  TLS 1.2 minimum (1.3 preferred, the ``ssl`` default when both sides have
  it); a client certificate is *optional* (FHIR clients have none), but one
  that is presented must be a current member's pinned certificate, or the
  handshake fails. ``/peer/v1`` then requires one (``api.peer``).
* :func:`client_context` — a client that trusts exactly the certificates it is
  given (a member's node: that member's certificate), checks the host name
  against them, and presents this node's certificate when asked.
* :class:`LiveServerTls` — a server context that follows its sources without
  a restart: every new handshake uses the certificate now in ``tls.crt`` /
  ``tls.key`` and trusts the client certificates of the members *now*
  (connections already open keep the context they were made with).

The key file is not sealed under the keystore passphrase: nats-server must
read it too, and a stolen TLS key lets its holder *connect* as the member, not
sign as it (requests and blocks are signed with the keystore's key).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medledger.core.errors import InvalidInput, NotFound
from medledger.core.tls import MemberCertificate
from medledger.storage.durable_files import fsync_dir
from medledger.storage.keystore import atomic_write

__all__ = [
    "DEFAULT_HOSTS",
    "VALID_DAYS",
    "LiveServerTls",
    "client_context",
    "create_certificate",
    "file_version",
    "is_loopback",
    "link_contexts",
    "load_certificate",
    "pem_bundle",
    "promote_renewed",
    "server_context",
    "write_certificate",
]

log = logging.getLogger(__name__)

#: Where a node on one machine is reached: its certificate names these by default.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
#: How long a new certificate is valid (renewal: ``member.rotate`` with a new one).
VALID_DAYS = 825


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listening or connecting address) stays on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise InvalidInput(f"{host!r} is not a host name or IP address")
    return x509.DNSName(host.lower())


def create_certificate(
    institution: str, hosts: Sequence[str], *, now_ms: int, valid_days: int = VALID_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, MemberCertificate]:
    """A new P-256 key and a self-signed certificate for ``institution`` naming ``hosts``."""
    if not hosts:
        raise InvalidInput("a TLS certificate needs at least one host name or address")
    names = list(dict.fromkeys(_san(h) for h in hosts))
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medledger member"),
            x509.NameAttribute(NameOID.COMMON_NAME, institution[:64]),
            # A name of its own per certificate: OpenSSL finds a trust anchor by
            # subject and tries only the first match, so while a renewal is under
            # way a trust store holding the member's old and new certificates
            # would otherwise accept only one of them.
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{serial:x}"[:64]),
        ]
    )
    now = datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        # A few minutes back: a peer whose clock is slightly behind still accepts it.
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, MemberCertificate(cert.public_bytes(serialization.Encoding.DER))


def write_certificate(
    cert_path: Path,
    key_path: Path,
    institution: str,
    hosts: Sequence[str],
    *,
    now_ms: int,
    valid_days: int = VALID_DAYS,
) -> MemberCertificate:
    """Create a key and certificate and write them (PEM, both 0600; the key first)."""
    key, cert = create_certificate(institution, hosts, now_ms=now_ms, valid_days=valid_days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert.pem().encode("ascii"), mode=0o600)
    return cert


def load_certificate(path: Path) -> MemberCertificate:
    """The member certificate in PEM file ``path``, checked (``core.tls``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no TLS certificate at {path}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise InvalidInput(f"{path} is not a PEM certificate") from None
    try:
        return MemberCertificate(cert.public_bytes(serialization.Encoding.DER))
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc}") from None


def promote_renewed(
    cert_path: Path,
    key_path: Path,
    next_cert: Path,
    next_key: Path,
    pinned: MemberCertificate | None,
) -> bool:
    """Move a renewed key and certificate into place once the consortium pins it.

    ``node tls-cert --renew`` writes ``next_key`` then ``next_cert`` and the
    node keeps serving (and presenting) the old pair, which the members still
    pin, until a ``member.tls`` carrying the new certificate is final. Then
    ``pinned`` (this member's certificate in the consortium state) is the new
    one and the pair is renamed over the old one, key first. A certificate
    left without its key is a promotion interrupted between the two renames
    (the renewal writes the key first): it is finished whatever ``pinned``
    says, since the key in place already belongs to it. Returns whether
    anything moved. Renames only: nothing is deleted that a later step needs.
    """
    if not next_cert.exists():
        return False
    if not next_key.exists():
        next_cert.replace(cert_path)
        fsync_dir(cert_path.parent)
        log.warning("finished an interrupted TLS certificate promotion")
        return True
    if pinned is None:
        return False
    try:
        pending = load_certificate(next_cert)
    except (NotFound, InvalidInput):
        return False
    if pending.fingerprint != pinned.fingerprint:
        return False
    # Between the two renames the key and certificate do not match: a LiveServerTls
    # keeps its previous context until both are in place.
    next_key.replace(key_path)
    next_cert.replace(cert_path)
    fsync_dir(cert_path.parent)
    log.info(
        "renewed TLS certificate in use", extra={"fields": {"fingerprint": pending.fingerprint}}
    )
    return True


def pem_bundle(anchors: Iterable[MemberCertificate]) -> str:
    """The PEM text of several certificates (a trust-anchor file or ``cadata``)."""
    return "".join(cert.pem() for cert in anchors)


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 only with forward-secret AEAD suites (TLS 1.3 suites are all of that kind).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_key_pair(ctx: ssl.SSLContext, cert_path: Path, key_path: Path | None) -> None:
    """Present ``cert_path`` with ``key_path`` (``None``: the key is in the certificate
    file); an unreadable or mismatched pair is ``InvalidInput`` naming the file."""
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"cannot load the TLS key and certificate ({cert_path}): {exc}"
        ) from None


def server_context(
    cert_path: Path, key_path: Path, client_anchors: Iterable[MemberCertificate] = ()
) -> ssl.SSLContext:
    """The HTTPS server's context (see the module docstring).

    ``client_anchors`` are the current members' certificates: a client that
    presents any other certificate fails the handshake.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_key_pair(ctx, cert_path, key_path)
    # Always asked for, also with no member yet: a context swapped in by LiveServerTls
    # keeps the verify mode of the one the connection started with (OpenSSL's
    # SSL_set_SSL_CTX), and with no anchor any presented certificate fails.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    anchors = pem_bundle(client_anchors)
    if anchors:
        ctx.load_verify_locations(cadata=anchors)
    return ctx


def file_version(path: Path) -> tuple[int, int, int, int]:
    """What changes when ``path`` is replaced or rewritten (an atomic rename: the inode)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LiveServerTls:
    """A server context whose certificate and client trust anchors follow their sources.

    ``context`` is what the HTTPS server listens with. At every new handshake
    (its SNI callback, which OpenSSL runs for every ClientHello, with or without
    a server name) the sources are compared with the ones the current context
    was built from: the key and certificate files (replaced by
    ``node tls-cert``, or promoted once a renewal is final) and ``anchors()``,
    the current members' pinned certificates (re-read, so a member added or
    removed by a final membership change may or may no longer connect). When
    one changed, a new context is built and the handshake switched to it;
    connections already open keep theirs. A source that cannot be loaded (a
    key that does not match its certificate while the two are being replaced)
    leaves the last good context in use, with a warning, and is retried at the
    next handshake.

    Comparing costs two ``stat`` calls and a tuple of fingerprints per
    handshake, next to an ECDHE key exchange.
    """

    def __init__(
        self,
        cert_path: Path,
        key_path: Path,
        anchors: Callable[[], Iterable[MemberCertificate]],
    ) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._anchors = anchors
        self._lock = threading.Lock()  # servers in threads (tests) share nothing else
        source = self._source()
        self._current = self._build(source)
        self._current_source = source
        self._failed_source: object = None
        #: The context the server listens with (the first one built, with the callback).
        self.context = self._current
        self.context.sni_callback = self._on_client_hello
        #: How many times a changed source was loaded (tests, logs).
        self.reloads = 0

    def _source(self) -> tuple[object, ...]:
        anchors = tuple(cert.fingerprint for cert in self._anchors())
        try:
            files: object = (file_version(self._cert_path), file_version(self._key_path))
        except OSError as exc:
            files = ("unreadable", str(exc))
        return (files, anchors)

    def _build(self, source: tuple[object, ...]) -> ssl.SSLContext:
        del source  # the context is built from the files and anchors as they are now
        return server_context(self._cert_path, self._key_path, tuple(self._anchors()))

    def current(self) -> ssl.SSLContext:
        """The context a handshake starting now uses (rebuilt first if a source changed)."""
        with self._lock:
            source = self._source()
            if source == self._current_source or source == self._failed_source:
                return self._current
            try:
                built = self._build(source)
            except (InvalidInput, ssl.SSLError, OSError) as exc:
                self._failed_source = source
                log.warning("keeping the previous TLS context: %s", exc)
                return self._current
            self._current, self._current_source = built, source
            self._failed_source = None
            self.reloads += 1
            log.info("TLS context reloaded (certificate or members changed)")
            return built

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: object
    ) -> None:
        current = self.current()
        if connection.context is not current:
            connection.context = current


def client_context(
    anchors: Iterable[MemberCertificate],
    *,
    cert_path: Path | None = None,
    key_path: Path | None = None,
) -> ssl.SSLContext:
    """A client context trusting exactly ``anchors``, presenting ``cert_path`` if given."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its host name
    bundle = pem_bundle(anchors)
    if not bundle:
        raise InvalidInput("no TLS trust anchor: the member has no pinned certificate")
    ctx.load_verify_locations(cadata=bundle)
    if cert_path is not None:
        _load_key_pair(ctx, cert_path, key_path)
    return ctx


def link_contexts(cert_path: Path, key_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The (server, client) contexts of the sequencer link between an institution's hosts.

    Mutual TLS pinned to the institution's own certificate: each end presents
    ``cert_path`` and trusts that certificate alone, so only a holder of the
    node's TLS key (a host of this institution) completes a handshake. Host
    names are not checked: the pin names the peer, wherever its host is.
    """
    anchors = [load_certificate(cert_path)]
    server = _base_context(ssl.PROTOCOL_TLS_SERVER)
    client = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    for ctx in (server, client):
        _load_key_pair(ctx, cert_path, key_path)
        ctx.load_verify_locations(cadata=pem_bundle(anchors))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return server, client
