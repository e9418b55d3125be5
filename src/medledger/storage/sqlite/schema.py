"""The tables of each SQLite store, with their schema versions.

A store's ``meta`` table records ``schema_version``; opening a file of
another version is refused. Additive, nullable columns (``chain_base``) are
added in place when missing, so files written by either release open in the
other.
"""

from __future__ import annotations

__all__ = [
    "CHAIN_SCHEMA",
    "CHAIN_SCHEMA_VERSION",
    "RECORDS_CHAIN_BASE",
    "RECORDS_DELETED",
    "RECORDS_PENDING_TOKENS",
    "RECORDS_SCHEMA",
    "RECORDS_SCHEMA_VERSION",
]

CHAIN_SCHEMA_VERSION = 1

CHAIN_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    header BLOB NOT NULL,
    signatures TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    tx_count INTEGER NOT NULL
);
CREATE INDEX blocks_by_first_index ON blocks(first_index);
-- hkey: the first 8 bytes of the tx hash as a signed integer. A small integer
-- index costs far less per insert than a 32-byte blob index; lookups confirm
-- the full hash against the data.
CREATE TABLE txs (idx INTEGER PRIMARY KEY, hkey INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX txs_by_hkey ON txs(hkey);
-- Perfect subtrees of level >= 1; leaf hashes are derived from txs.data.
CREATE TABLE nodes (id INTEGER PRIMARY KEY, hash BLOB NOT NULL);
"""

RECORDS_SCHEMA_VERSION = 1
RECORDS_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    rtype TEXT NOT NULL,
    rid TEXT NOT NULL,
    version INTEGER NOT NULL,
    blob_hash BLOB NOT NULL,
    wrapped_dek BLOB,
    kek_id TEXT,
    patient TEXT,
    updated_ms INTEGER NOT NULL,
    tx_hash BLOB NOT NULL,
    erased INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rtype, rid, version)
) WITHOUT ROWID;
CREATE INDEX versions_by_patient ON versions(patient);
CREATE INDEX versions_by_kek ON versions(kek_id);
CREATE INDEX versions_by_updated ON versions(rtype, updated_ms);
CREATE TABLE tokens (token BLOB NOT NULL, rtype TEXT NOT NULL, rid TEXT NOT NULL);
CREATE INDEX tokens_by_token ON tokens(token, rtype);
CREATE INDEX tokens_by_record ON tokens(rtype, rid);
"""
# Added after schema version 1 shipped: additive and nullable, so files written by
# either release open in the other (an older release leaves chain_base NULL).
RECORDS_CHAIN_BASE = """
ALTER TABLE versions ADD COLUMN chain_base INTEGER;
CREATE INDEX versions_by_chain_base ON versions(chain_base);
"""
# Added with soft delete, additive in the same way: an older release reads every
# version as live (it cannot tell a deletion from a version with no search terms).
RECORDS_DELETED = """
ALTER TABLE versions ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
"""
# Added with search tokens committed after the acknowledgement (decision 0069): a
# version listed here has its row (and wrapped key) durable but its tokens still to
# come. Additive: an older release ignores the table.
RECORDS_PENDING_TOKENS = """
CREATE TABLE IF NOT EXISTS pending_tokens (
    rtype TEXT NOT NULL,
    rid TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (rtype, rid, version)
) WITHOUT ROWID;
"""
