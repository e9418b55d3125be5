"""A member's TLS certificate, as the consortium pins it. Pure.

Each institution has its own TLS key and a **self-signed** X.509 certificate
for it; the consortium pins the certificate itself (hex DER, ``tls_cert`` in
the genesis member entry and in ``member.add`` / ``member.rotate``). There is
no consortium CA: nobody can mint a certificate that another member accepts,
and adding, rotating or removing a member changes who may connect
(docs/decisions/0029-tls-pinned-member-certificates.md).

What a pinned certificate must be, checked here before it is believed:

* DER X.509 v3, self-signed (its signature verifies under its own key), with a
  P-256 ECDSA key;
* ``BasicConstraints`` CA=false (it can sign nothing else, so pinning it as a
  trust anchor trusts exactly this one certificate);
* ``ExtendedKeyUsage`` serverAuth and clientAuth (the same certificate serves
  the node's API, NATS, and the member's side of mutual TLS);
* at least one subject alternative name (what clients check the host against).

The certificate fingerprint is the hex SHA-256 of its DER encoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from medledger.core.errors import InvalidInput
from medledger.core.hashing import sha256

__all__ = ["MemberCertificate", "certificate_fingerprint"]


def certificate_fingerprint(der: bytes) -> str:
    """Hex SHA-256 of a certificate's DER bytes."""
    return sha256(der).hex()


@dataclass(frozen=True, slots=True)
class MemberCertificate:
    """A checked, self-signed member TLS certificate (see the module docstring)."""

    der: bytes
    fingerprint: str = field(init=False)
    #: Validity, in ms since the epoch (``not_valid_before``/``after``).
    not_before_ms: int = field(init=False)
    not_after_ms: int = field(init=False)
    #: DNS names and IP addresses the certificate names.
    hosts: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        try:
            cert = x509.load_der_x509_certificate(self.der)
        except ValueError:
            raise InvalidInput("tls_cert is not a DER X.509 certificate") from None
        if cert.version is not x509.Version.v3:
            raise InvalidInput("tls_cert must be an X.509 v3 certificate")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise InvalidInput("tls_cert must carry a P-256 ECDSA key")
        if cert.issuer != cert.subject:
            raise InvalidInput("tls_cert must be self-signed")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, _CryptoInvalidSignature):
            raise InvalidInput("tls_cert's self-signature does not verify") from None
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise InvalidInput(f"tls_cert lacks an extension ({exc.oid.dotted_string})") from None
        if basic.ca:
            raise InvalidInput("tls_cert must not be a CA certificate")
        if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage):
            raise InvalidInput("tls_cert must allow both serverAuth and clientAuth")
        hosts = [*names.get_values_for_type(x509.DNSName)]
        hosts += [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
        if not hosts:
            raise InvalidInput("tls_cert names no host (subjectAltName DNS or IP)")
        object.__setattr__(self, "fingerprint", certificate_fingerprint(self.der))
        object.__setattr__(self, "not_before_ms", int(cert.not_valid_before_utc.timestamp() * 1000))
        object.__setattr__(self, "not_after_ms", int(cert.not_valid_after_utc.timestamp() * 1000))
        object.__setattr__(self, "hosts", tuple(hosts))

    @classmethod
    def from_hex(cls, text: str) -> MemberCertificate:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidInput("tls_cert is not hex") from None

    def hex(self) -> str:
        return self.der.hex()

    def pem(self) -> str:
        """PEM text (what ``ssl`` and nats-server load as a trust anchor)."""
        import base64
        import textwrap

        body = "\n".join(textwrap.wrap(base64.b64encode(self.der).decode("ascii"), 64))
        return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
