"""Patients, consent, sharing and the audit trail from the command line.

``patient init|show`` work on a wallet file alone. ``patient enroll|rotate|rebind``,
``consent grant|revoke|list`` and ``share list|fetch`` talk to a running node
over its HTTPS API (``--node`` URL, ``--node-cert`` the node's pinned
certificate, and ``--token``, or ``MEDLEDGER_NODE_URL`` / ``MEDLEDGER_NODE_CERT``
/ ``MEDLEDGER_TOKEN``): the wallet signs locally and only signed transactions
leave this machine. ``audit --patient`` reads a node's chains from its
directory (no passphrase, no running node needed); it names enrollments, key
rotations and break-glass re-bindings (``event``) beside consents and reads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from medledger.cli.common import dir_option, emit, fail, read_passphrase
from medledger.ledger.clock import SystemClock

__all__ = ["audit", "consent", "patient", "share"]

WALLET_ENV = "MEDLEDGER_WALLET_PASSPHRASE"
NEW_WALLET_ENV = "MEDLEDGER_NEW_WALLET_PASSPHRASE"
_DAY_MS = 86_400_000

wallet_option = click.option(
    "--wallet",
    "wallet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The patient's wallet file.",
)
_NODE_CERT = "medledger.node_cert"


def _remember_node_cert(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    ctx.meta[_NODE_CERT] = value


def node_option(command: Any) -> Any:
    """``--node URL`` and ``--node-cert PEM`` (the node's pinned TLS certificate)."""
    command = click.option(
        "--node-cert",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="MEDLEDGER_NODE_CERT",
        expose_value=False,
        callback=_remember_node_cert,
        help="The node's TLS certificate (PEM, its tls.crt): trusted alone. Without it an "
        "https node must present a certificate the system trusts.",
    )(command)
    return click.option(
        "--node", "node_url", envvar="MEDLEDGER_NODE_URL", required=True, help="Node URL."
    )(command)


def _verify() -> Any:
    """What the HTTP client trusts: the ``--node-cert`` certificate alone, else the system's."""
    ctx = click.get_current_context(silent=True)
    cert = ctx.meta.get(_NODE_CERT) if ctx is not None else None
    if cert is None:
        return True
    from medledger.core.errors import MedledgerError
    from medledger.services.tls import client_context, load_certificate

    try:
        return client_context([load_certificate(cert)])
    except MedledgerError as exc:
        fail(str(exc))


token_option = click.option(
    "--token", envvar="MEDLEDGER_TOKEN", required=True, help="Bearer token for the node."
)


def _wallet(path: Path, *, create: bool = False) -> Any:
    from medledger.services.patients import PatientWallet

    passphrase = read_passphrase(confirm=create, env=WALLET_ENV, label="Wallet passphrase")
    if create:
        return PatientWallet.create(path, passphrase)
    return PatientWallet.open(path, passphrase)


def _call(
    node_url: str, token: str, method: str, path: str, body: Any = None, **params: Any
) -> Any:
    """One API call; an OperationOutcome becomes a one-line error and a non-zero exit."""
    import httpx

    from medledger.core.encoding import canonical_bytes

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    try:
        response = httpx.request(
            method,
            node_url.rstrip("/") + path,
            headers=headers,
            content=None if body is None else canonical_bytes(body),
            params={k: v for k, v in params.items() if v is not None},
            timeout=60,
            verify=_verify(),
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach {node_url}: {_why(exc)}")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code >= 400:
        reason = "no reason given"
        if isinstance(answer, dict) and answer.get("issue"):
            reason = str(answer["issue"][0].get("diagnostics", reason))
        fail(f"{response.status_code}: {reason}")
    return answer


def _why(exc: Exception) -> str:
    """What went wrong, in one line: the error's kind and the reason it gives, if any
    (``ConnectError: [Errno 111] Connection refused``). Neither holds the request's
    headers, so no token is printed."""
    reason = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _ready(node_url: str) -> dict[str, Any]:
    import httpx

    try:
        answer: dict[str, Any] = httpx.get(
            node_url.rstrip("/") + "/readyz", timeout=10, verify=_verify()
        ).json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"cannot reach {node_url}: {_why(exc)}")
    if "consortium" not in answer:
        fail(f"{node_url} has not joined a consortium")
    return answer


def _now() -> int:
    return SystemClock().now_ms()


def _start_ms(text: str) -> int:
    """``--start``: an ISO 8601 date or date-time, UTC unless it names an offset."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"--start {text!r} is not an ISO 8601 date or date-time (e.g. 2026-03-01T08:00Z)", 2)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@click.group()
def patient() -> None:
    """A patient's wallet: the key whose fingerprint is the patient on every chain."""


@patient.command("init")
@wallet_option
def patient_init(wallet_path: Path) -> None:
    """Create a wallet (passphrase from MEDLEDGER_WALLET_PASSPHRASE or a prompt)."""
    wallet = _wallet(wallet_path, create=True)
    emit({"wallet": str(wallet_path), "fingerprint": wallet.fingerprint})


@patient.command("show")
@wallet_option
def patient_show(wallet_path: Path) -> None:
    """The wallet's fingerprint and public key."""
    wallet = _wallet(wallet_path)
    emit({"fingerprint": wallet.fingerprint, "public_key": wallet.public.pem()})


@patient.command("export-key")
@wallet_option
@click.option(
    "--for-browser",
    "for_browser",
    is_flag=True,
    required=True,
    help="Required: the export is an unencrypted JWK for a browser's sign-in page.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="A new file (mode 0600); an existing one is never overwritten.",
)
def patient_export_key(wallet_path: Path, for_browser: bool, out: Path) -> None:
    """Export the wallet key for the sign-in page of a node (import it, then delete the file)."""
    if not for_browser:
        fail("export-key only exports --for-browser", 2)
    wallet = _wallet(wallet_path)
    wallet.export_browser_key(out)
    emit(
        {
            "file": str(out),
            "fingerprint": wallet.fingerprint,
            "note": "unencrypted key: import it on the sign-in page, then delete this file",
        }
    )


def _enrollment(node_url: str, token: str, patient_id: str) -> dict[str, Any]:
    """What the node says a wallet signs for Patient/ID there, and the key bound now."""
    answer: dict[str, Any] = _call(
        node_url, token, "GET", f"/fhir/Patient/{patient_id}/$enrollment"
    )
    return answer


@patient.command("enroll")
@wallet_option
@node_option
@token_option
@click.option("--patient-id", required=True, help="The Patient's id at that node.")
def patient_enroll(wallet_path: Path, node_url: str, token: str, patient_id: str) -> None:
    """Link Patient/ID at a node to this wallet (the wallet proves it holds the key)."""
    wallet = _wallet(wallet_path)
    where = _enrollment(node_url, token, patient_id)
    signature = wallet.enrollment_signature(where["institution"], where["pseudonym"])
    body = {"patient_key": wallet.public.der().hex(), "signature": signature.to_json()}
    emit(_call(node_url, token, "POST", f"/fhir/Patient/{patient_id}/$enroll", body))


@patient.command("rotate")
@wallet_option
@click.option(
    "--new-wallet",
    "new_wallet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The wallet to move to (create it first with 'patient init').",
)
@node_option
@token_option
@click.option("--patient-id", required=True, help="The Patient's id at that node.")
def patient_rotate(
    wallet_path: Path, new_wallet_path: Path, node_url: str, token: str, patient_id: str
) -> None:
    """Move Patient/ID at a node from --wallet (the key bound now) to --new-wallet.

    The new wallet's passphrase comes from MEDLEDGER_NEW_WALLET_PASSPHRASE or a prompt.
    """
    from medledger.services.patients import PatientWallet

    old = _wallet(wallet_path)
    new = PatientWallet.open(
        new_wallet_path,
        read_passphrase(confirm=False, env=NEW_WALLET_ENV, label="New wallet passphrase"),
    )
    where = _enrollment(node_url, token, patient_id)
    institution, pseudonym = where["institution"], where["pseudonym"]
    body = {
        "patient_key": new.public.der().hex(),
        "signature": new.enrollment_signature(institution, pseudonym).to_json(),
        "previous_key": old.public.der().hex(),
        "previous_signature": old.rotation_signature(
            institution, pseudonym, new.fingerprint
        ).to_json(),
    }
    emit(_call(node_url, token, "POST", f"/fhir/Patient/{patient_id}/$rotate-key", body))


@patient.command("rebind")
@wallet_option
@node_option
@token_option
@click.option("--patient-id", required=True, help="The Patient's id at that node.")
def patient_rebind(wallet_path: Path, node_url: str, token: str, patient_id: str) -> None:
    """Break-glass (admin token): bind Patient/ID to --wallet without the old key.

    For a patient whose key is lost or stolen. The re-binding is announced on
    the consortium, recorded on the node's chain with the admin token's id,
    and shown in the trails of both keys.
    """
    wallet = _wallet(wallet_path)
    where = _enrollment(node_url, token, patient_id)
    signature = wallet.enrollment_signature(where["institution"], where["pseudonym"])
    body = {"patient_key": wallet.public.der().hex(), "signature": signature.to_json()}
    emit(_call(node_url, token, "POST", f"/admin/patients/{patient_id}/rebind", body))


@click.group()
def consent() -> None:
    """Grant, revoke and list patient consents (final on the consortium chain)."""


@consent.command("grant")
@wallet_option
@node_option
@token_option
@click.option("--grantee", required=True, help="Member id allowed to read.")
@click.option(
    "--scope", default="*", show_default=True, help="Resource types, comma-separated, or '*'."
)
@click.option("--purpose", default="TREAT", show_default=True, help="HL7 PurposeOfUse code.")
@click.option(
    "--start",
    default=None,
    help="When the consent starts (ISO 8601, UTC unless an offset is given); default now.",
)
@click.option(
    "--days",
    type=click.FloatRange(min=0.0001),
    default=30,
    show_default=True,
    help="How long it lasts from its start.",
)
def consent_grant(
    wallet_path: Path,
    node_url: str,
    token: str,
    grantee: str,
    scope: str,
    purpose: str,
    start: str | None,
    days: float,
) -> None:
    """Sign a consent.grant with the wallet and submit it; prints the final Consent.

    A consent with a later --start is final at once but honoured only from its start.
    """
    from medledger.core.errors import MedledgerError
    from medledger.services.consent_fhir import consent_for_grant

    starts = None if start is None else _start_ms(start)
    wallet = _wallet(wallet_path)
    chain = str(_ready(node_url)["consortium"])
    now = _now()
    try:
        tx = wallet.grant(
            chain=chain,
            grantee=grantee,
            scope=[s.strip() for s in scope.split(",") if s.strip()],
            purpose=purpose,
            expires_ms=(now if starts is None else starts) + int(days * _DAY_MS),
            time_ms=now,
            starts_ms=starts,
        )
    except MedledgerError as exc:
        fail(str(exc), 2)
    emit(_call(node_url, token, "POST", "/fhir/Consent", consent_for_grant(tx)))


@consent.command("revoke")
@wallet_option
@node_option
@token_option
@click.argument("consent_id")
def consent_revoke(wallet_path: Path, node_url: str, token: str, consent_id: str) -> None:
    """Sign a consent.revoke of CONSENT_ID and submit it; effective once final."""
    from medledger.core.errors import MedledgerError
    from medledger.core.hashing import hash_from_hex
    from medledger.services.consent_fhir import revocation_for

    wallet = _wallet(wallet_path)
    chain = str(_ready(node_url)["consortium"])
    try:
        tx = wallet.revoke(
            chain=chain, grant=hash_from_hex(consent_id, "consent id"), time_ms=_now()
        )
    except MedledgerError as exc:
        fail(str(exc), 2)
    emit(_call(node_url, token, "PUT", f"/fhir/Consent/{consent_id}", revocation_for(tx)))


@consent.command("list")
@node_option
@token_option
@click.option("--patient", "fingerprint", default=None, help="Patient key fingerprint.")
def consent_list(node_url: str, token: str, fingerprint: str | None) -> None:
    """Consents as FHIR Consent resources (a searchset Bundle)."""
    emit(_call(node_url, token, "GET", "/fhir/Consent", patient=fingerprint))


@click.group()
def share() -> None:
    """Verified cross-institution reads under a patient's consent."""


@share.command("list")
@node_option
@token_option
@click.option("--holder", required=True, help="Member that holds the records.")
@click.option("--consent", "consent_id", required=True, help="The consent's id (tx hash).")
def share_list(node_url: str, token: str, holder: str, consent_id: str) -> None:
    """What the consent lets this node fetch from HOLDER."""
    emit(_call(node_url, token, "GET", f"/share/{holder}", consent=consent_id))


@share.command("fetch")
@node_option
@token_option
@click.option("--holder", required=True, help="Member that holds the record.")
@click.option("--consent", "consent_id", required=True, help="The consent's id (tx hash).")
@click.argument("resource")
def share_fetch(node_url: str, token: str, holder: str, consent_id: str, resource: str) -> None:
    """Fetch RESOURCE (Type/id) from HOLDER; prints it with its verified provenance."""
    rtype, _, rid = resource.partition("/")
    if not rtype or not rid or "/" in rid:
        fail("RESOURCE must be Type/id", 2)
    emit(_call(node_url, token, "GET", f"/share/{holder}/{rtype}/{rid}", consent=consent_id))


@click.command("audit")
@dir_option
@click.option("--patient", "fingerprint", required=True, help="Patient key fingerprint.")
def audit(root: Path, fingerprint: str) -> None:
    """Who read what of a patient, where, when, under which consent (from ROOT's chains)."""
    from medledger.core.errors import MedledgerError
    from medledger.core.hashing import hash_from_hex
    from medledger.services.trail import patient_trail
    from medledger.stores import open_chain, open_consortium_chain

    hash_from_hex(fingerprint, "--patient fingerprint")
    _, private = open_chain(root)
    stores = [private]
    try:
        # A node that joined no consortium has its own trail only.
        with contextlib.suppress(MedledgerError):
            stores.append(open_consortium_chain(root)[1])
        emit({"patient": fingerprint, "trail": patient_trail(stores, fingerprint)})
    finally:
        for store in stores:
            store.close()
