"""How SQLite and PostgreSQL spell what SQL written once for both leaves open.

Statements shared by both backends (:mod:`~medledger.storage.record_sql`,
:mod:`~medledger.storage.tokens`) are written with ``?`` placeholders and
standard SQL both accept (``ON CONFLICT … DO UPDATE``, ``TRUE``, row values);
a :class:`Dialect` renders them for its driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["POSTGRES", "SQLITE", "Dialect"]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one backend spells what the shared statements leave open."""

    name: str
    #: The driver's positional placeholder (``?`` for sqlite3, ``%s`` for psycopg).
    placeholder: str
    #: Appended to a SELECT that is followed by an UPDATE of the same rows.
    lock_rows: str

    def render(self, text: str) -> str:
        """``text`` with every ``?`` turned into this dialect's placeholder."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE: Final = Dialect(name="sqlite", placeholder="?", lock_rows="")
POSTGRES: Final = Dialect(name="postgres", placeholder="%s", lock_rows=" FOR UPDATE")
