"""The kinds of message in the consortium's ordered stream.

Each message is a canonical JSON object whose ``kind`` says what it is (the
formats are in docs/formats.md): a transaction (``tx``), a member's cut marker
(``cut``), a member's vote with its clock reading (``vote``; also broadcast
beside the order, decision 0063) and a member's idle notice (``idle``,
decision 0066). They live apart from the member so the modules that handle
one kind need not import the member.
"""

from __future__ import annotations

__all__ = ["MSG_CUT", "MSG_IDLE", "MSG_TX", "MSG_VOTE"]

MSG_TX, MSG_CUT, MSG_VOTE, MSG_IDLE = "tx", "cut", "vote", "idle"
