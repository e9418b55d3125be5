"""The strength floor for a passphrase that protects keys at rest. Pure.

A keystore or wallet file that leaves the machine (a backup, a stolen disk)
can be attacked offline, guess after guess, with nothing to stop or notice
it; scrypt makes each guess cost, but a one-letter passphrase falls on the
first few. So a passphrase that is *set* (``node init``, ``network up`` on a
new network, ``patient init``) must have at least :data:`MIN_CHARACTERS`
characters, not counting whitespace at either end, and at least
:data:`MIN_DISTINCT` different characters (``"aaaaaaaaaaaa"`` is one guess
away). Following NIST SP 800-63B §5.1.1.2 there are no composition rules
(a few unrelated words pass). Opening an existing file never checks: data
sealed under an older, weaker passphrase stays readable (decision 0028).
"""

from __future__ import annotations

from medledger.core.errors import InvalidInput

__all__ = ["MIN_CHARACTERS", "MIN_DISTINCT", "check_new_passphrase"]

#: Characters a new passphrase needs, not counting leading and trailing whitespace.
MIN_CHARACTERS = 12
#: Different characters a new passphrase needs.
MIN_DISTINCT = 5


def check_new_passphrase(passphrase: bytes, *, what: str = "passphrase") -> None:
    """Return if ``passphrase`` (UTF-8) may protect a new file; raise :class:`InvalidInput`.

    ``what`` names the passphrase in the message (``"keystore passphrase"``).
    The message never repeats the passphrase.
    """
    try:
        text = passphrase.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidInput(f"the {what} is not valid UTF-8") from None
    if len(text) < MIN_CHARACTERS or len(set(text)) < MIN_DISTINCT:
        raise InvalidInput(
            f"the {what} is too weak: use at least {MIN_CHARACTERS} characters "
            f"(spaces at either end do not count) with at least {MIN_DISTINCT} different "
            "ones, e.g. a few unrelated words"
        )
