"""The one error hierarchy of medledger.

Every failure medledger reports on purpose is a :class:`MedledgerError`.
Callers catch the narrowest class they can act on; the API and the CLI map
errors to HTTP / OperationOutcome and exit codes in exactly one place each.

::

    MedledgerError
    ├── VerificationError          something does not check out
    │   ├── InvalidSignature       a signature does not verify under the key
    │   ├── RootMismatch           a recomputed Merkle root differs (has both roots)
    │   ├── InconsistentLog        two log states cannot both be true
    │   └── IntegrityError         stored bytes do not match their hash / chain
    │       └── RecordDamaged      acknowledged data is missing or altered in the node's store
    ├── InvalidInput               malformed or unacceptable input
    │   └── OAuthError             an OAuth 2.0 refusal, with its RFC 6749 error code
    ├── NotFound                   no such block, transaction, record or key
    │   └── Gone                   it existed and was erased (FHIR 410)
    ├── Conflict                   a write contradicts current state
    │   └── PreconditionFailed     If-Match names another version (HTTP 412)
    ├── ConsentDenied              no consent authorizes the request
    ├── RateLimited                too many failures from one client; retry later
    ├── KeyStoreError              keystore missing, locked or wrong passphrase
    ├── StorageError               the storage backend failed or is corrupt
    │   ├── RetryableStorageError  a transient failure; the same call may succeed
    │   ├── DamagedStore           a store failed its start-up check; the node will not serve
    │   └── StorageFull            no space left for a write (HTTP 507); nothing was stored
    └── OrderingError              the consortium ordering service failed

Messages are one line, name *what* and *where* (height, index, record), and
never contain PHI or key material.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "DamagedStore",
    "Deposed",
    "Gone",
    "PreconditionFailed",
    "ConsentDenied",
    "InconsistentLog",
    "IntegrityError",
    "InvalidInput",
    "InvalidSignature",
    "KeyStoreError",
    "MedledgerError",
    "NotFound",
    "OAuthError",
    "OrderingError",
    "RateLimited",
    "RetryableStorageError",
    "RootMismatch",
    "StorageError",
    "StorageFull",
    "RecordDamaged",
    "VerificationError",
]


class MedledgerError(Exception):
    """Base of every error medledger raises on purpose."""


class VerificationError(MedledgerError):
    """A signature, hash, proof or chain link does not check out.

    ``step`` names the step of ``ledger.verify.verify_chain`` that failed (its
    ``STEPS``), when the error came from a whole-chain verification; the
    message then ends with it, so an auditor knows which check to look up.
    """

    step: str | None = None
    #: Which chain the message's block heights are of ("private chain of X",
    #: "consortium chain Y"), when the error came from a whole-chain verification;
    #: the message then starts with it.
    chain: str | None = None

    def __str__(self) -> str:
        message = super().__str__()
        if self.chain is not None:
            joint = ", " if message.startswith("block ") else ": "
            message = f"{self.chain}{joint}{message}"
        return message if self.step is None else f"{message} (verify step: {self.step})"


class InvalidSignature(VerificationError):
    """A signature does not verify under the claimed key."""


class RootMismatch(VerificationError):
    """A Merkle root recomputed from a proof differs from the expected root."""

    def __init__(self, message: str, *, expected: bytes, calculated: bytes) -> None:
        super().__init__(f"{message}: expected {expected.hex()}, calculated {calculated.hex()}")
        self.expected = expected
        self.calculated = calculated


class InconsistentLog(VerificationError):
    """Two states of an append-only log cannot both be true (history was rewritten)."""


class IntegrityError(VerificationError):
    """Stored bytes do not match the hash or chain that commits to them."""


class RecordDamaged(IntegrityError):
    """Data the index and the chain say was acknowledged is missing or altered in the store.

    Distinct from "no such record" (:class:`NotFound`): an acknowledged write
    was lost or damaged, so the node's store needs an operator (restore or
    re-fetch). Messages name the record by type, keyed ref and version — the
    ref is already on the chain, so the message carries no PHI.
    """


class InvalidInput(MedledgerError):
    """Input is malformed or not acceptable; nothing was changed."""


class OAuthError(InvalidInput):
    """The authorization server refuses a request (RFC 6749 §4.1.2.1, §5.2).

    ``error`` is the RFC's code (``invalid_request``, ``invalid_client``,
    ``invalid_grant``, ``invalid_scope``, ``access_denied``, …). When
    ``redirect_uri`` is set the refusal may be sent back to the client there
    (with ``state``); without it the client or its redirect URI could not be
    trusted, so the refusal is shown to the user instead (§4.1.2.1).
    """

    def __init__(
        self,
        error: str,
        message: str,
        *,
        redirect_uri: str | None = None,
        state: str | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state
        self.status = status

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _oauth_error,
            (self.error, str(self), self.redirect_uri, self.state, self.status),
        )


def _oauth_error(
    error: str, message: str, redirect_uri: str | None, state: str | None, status: int
) -> OAuthError:
    return OAuthError(error, message, redirect_uri=redirect_uri, state=state, status=status)


class NotFound(MedledgerError):
    """The requested block, transaction, record or key does not exist."""


class Gone(NotFound):
    """The resource existed and was erased (crypto-shredded)."""


class Conflict(MedledgerError):
    """The write contradicts the current state (e.g. a stale version)."""


class PreconditionFailed(Conflict):
    """A conditional write's precondition (``If-Match``) does not hold."""


class WriteRaced(Conflict):
    """Another API worker wrote the resource between this write's read and its commit.

    The sequencer refused the commit and nothing was written; the write may be
    sealed again on the newer version (``services.records.writes``).
    """


class ConsentDenied(MedledgerError):
    """No final, unrevoked, unexpired consent authorizes the request."""


class RateLimited(MedledgerError):
    """A client or member used up its failure budget; nothing was done (HTTP 429).

    ``retry_after_ms`` says when the budget has room again.
    """

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only state survives pickling (errors can cross process boundaries).
        return (_rate_limited, (str(self), self.retry_after_ms))


def _rate_limited(message: str, retry_after_ms: int) -> RateLimited:
    return RateLimited(message, retry_after_ms=retry_after_ms)


class KeyStoreError(MedledgerError):
    """The keystore is missing, corrupt, or the passphrase is wrong."""


class StorageError(MedledgerError):
    """The storage backend failed or holds data it cannot read."""


class RetryableStorageError(StorageError):
    """A transient storage failure; retrying the same call may succeed."""


class SequencerUnavailable(RetryableStorageError):
    """An API worker could not reach the node's sequencer, or lost it with a write in flight.

    The write may or may not be committed (HTTP 503): the client retries, and a
    retried create may then exist twice, as after any lost answer.
    """


class Deposed(SequencerUnavailable):
    """This process no longer holds the sequencer lease: another host took over.

    Raised by a fenced chain append of a deposed sequencer; nothing was appended
    (HTTP 503: the client retries, and its write reaches the active sequencer).
    """


class StaleKeys(RetryableStorageError):
    """An API worker sealed a version under a key-encryption key that is no longer current.

    Nothing was written; the worker restarts to load the rotated keys (HTTP 503).
    """


class DamagedStore(StorageError):
    """A store is damaged, or behind what was acknowledged or anchored.

    Raised by the start-up checks; the node refuses to open (and so to serve,
    recover or extend the chain) until an operator repairs the store.
    """


class StorageFull(StorageError):
    """The file system or database has no space for a write; nothing of it was stored."""


class OrderingError(MedledgerError):
    """The consortium ordering service failed or refused a transaction."""
