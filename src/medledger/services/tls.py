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

The key file is not sealed under the keystore passphrase: nats-server must
read it too, and a stolen TLS key lets its holder *connect* as the member, not
sign as it (requests and blocks are signed with the keystore's key).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medledger.core.errors import InvalidInput, NotFound
from medledger.core.tls import MemberCertificate
from medledger.storage.keystore import atomic_write

__all__ = [
    "DEFAULT_HOSTS",
    "VALID_DAYS",
    "client_context",
    "create_certificate",
    "is_loopback",
    "load_certificate",
    "pem_bundle",
    "server_context",
    "write_certificate",
]

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
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medledger member"),
            x509.NameAttribute(NameOID.COMMON_NAME, institution[:64]),
        ]
    )
    now = datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
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


def server_context(
    cert_path: Path, key_path: Path, client_anchors: Iterable[MemberCertificate] = ()
) -> ssl.SSLContext:
    """The HTTPS server's context (see the module docstring).

    ``client_anchors`` are the current members' certificates: a client that
    presents any other certificate fails the handshake.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"cannot load the TLS key and certificate ({cert_path}): {exc}"
        ) from None
    anchors = pem_bundle(client_anchors)
    if anchors:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=anchors)
    return ctx


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
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"cannot load the TLS key and certificate ({cert_path}): {exc}"
            ) from None
    return ctx
