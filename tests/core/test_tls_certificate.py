"""Pinned member TLS certificates (core.tls) and their place in the genesis and membership."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medledger.core.consortium import Genesis, Member, MemberSet
from medledger.core.errors import InvalidInput
from medledger.core.keys import SigningKey
from medledger.core.tls import MemberCertificate, certificate_fingerprint
from medledger.services.tls import create_certificate

NOW_MS = 1_767_225_600_000


def _build(
    *,
    ca: bool = False,
    usages: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    names: tuple[x509.GeneralName, ...] = (x509.DNSName("localhost"),),
    key: object = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    issuer: str = "a",
) -> bytes:
    own = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    now = datetime.datetime.fromtimestamp(NOW_MS / 1000, tz=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(own.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    cert = builder.sign(signer or own, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_created_certificate_is_accepted_and_names_its_hosts() -> None:
    _, cert = create_certificate("hosp-a", ["localhost", "127.0.0.1", "::1"], now_ms=NOW_MS)
    again = MemberCertificate(cert.der)
    assert again.fingerprint == certificate_fingerprint(cert.der) == cert.fingerprint
    assert set(again.hosts) == {"localhost", "127.0.0.1", "::1"}
    assert again.not_before_ms < NOW_MS < again.not_after_ms
    assert MemberCertificate.from_hex(cert.hex()) == cert
    loaded = x509.load_pem_x509_certificate(cert.pem().encode())
    assert loaded.public_bytes(serialization.Encoding.DER) == cert.der


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"not a certificate", "not a DER X.509"),
        (lambda: _build(ca=True), "must not be a CA"),
        (lambda: _build(usages=(ExtendedKeyUsageOID.SERVER_AUTH,)), "serverAuth and clientAuth"),
        (lambda: _build(usages=()), "lacks an extension"),
        (lambda: _build(names=()), "lacks an extension"),
        (lambda: _build(issuer="someone else"), "self-signed"),
        (
            lambda: _build(signer=ec.generate_private_key(ec.SECP256R1())),
            "self-signature does not verify",
        ),
        (
            lambda: _build(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "P-256",
        ),
        (lambda: _build(key=ec.generate_private_key(ec.SECP384R1())), "P-256"),
    ],
)
def test_a_certificate_that_could_vouch_for_others_or_for_nothing_is_refused(
    make: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        MemberCertificate(make())


def _member(member_id: str, cert: MemberCertificate | None) -> Member:
    key = SigningKey.generate().public
    return Member(id=member_id, name=member_id, signing_key=key, tls_cert=cert)


def test_the_genesis_carries_the_pinned_certificates_and_old_entries_are_unchanged() -> None:
    cert_a = create_certificate("a", ["localhost"], now_ms=NOW_MS)[1]
    with_tls = _member("a", cert_a)
    without = _member("b", None)
    assert "tls_cert" not in without.to_json()  # older genesis documents hash as before
    assert with_tls.to_json()["tls_cert"] == cert_a.hex()
    genesis = Genesis(consortium="c", time_ms=1, members=(with_tls, without))
    back = Genesis.from_json(genesis.to_json())
    assert back == genesis and back.hash() == genesis.hash()
    members = MemberSet(back.members)
    assert members.by_certificate(cert_a.fingerprint) == with_tls
    assert members.tls_certificates() == (cert_a,)


def test_a_member_entry_with_a_bad_certificate_is_refused() -> None:
    entry = _member("a", None).to_json()
    with pytest.raises(InvalidInput, match="member a: tls_cert is not hex"):
        Member.from_json({**entry, "tls_cert": "zz"})
    with pytest.raises(InvalidInput, match="member a: tls_cert must not be a CA"):
        Member.from_json({**entry, "tls_cert": _build(ca=True).hex()})
    with pytest.raises(InvalidInput, match="exactly"):
        Member.from_json({**entry, "tls_certs": ""})


def test_two_members_cannot_share_a_certificate() -> None:
    cert = create_certificate("a", ["localhost"], now_ms=NOW_MS)[1]
    with pytest.raises(InvalidInput, match="distinct TLS certificates"):
        Genesis(consortium="c", time_ms=1, members=(_member("a", cert), _member("b", cert)))
    members = MemberSet((_member("a", cert),))
    with pytest.raises(InvalidInput, match="TLS certificate belongs to a member"):
        members.with_member(_member("b", cert))
    other = MemberSet((_member("a", None), _member("b", cert)))
    with pytest.raises(InvalidInput, match="already belongs to a member"):
        other.rotated("a", SigningKey.generate().public, tls_cert=cert)


def test_rotation_replaces_the_certificate_only_when_given() -> None:
    old = create_certificate("a", ["localhost"], now_ms=NOW_MS)[1]
    new = create_certificate("a", ["localhost"], now_ms=NOW_MS)[1]
    members = MemberSet((_member("a", old),))
    kept = members.rotated("a", SigningKey.generate().public)
    assert kept.members[0].tls_cert == old
    replaced = members.rotated("a", SigningKey.generate().public, tls_cert=new)
    assert replaced.members[0].tls_cert == new
    assert replaced.by_certificate(old.fingerprint) is None
