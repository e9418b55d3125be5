"""The SQLite backend (the embedded default): one file per store, WAL, ``synchronous=FULL``.

``connection`` (connections, transactions, error mapping), ``schema`` (the
tables of each store), ``chain``, ``records``, ``tokens`` and ``nonces`` (one
adapter each). Blobs of a SQLite node are files (:mod:`medledger.storage.blobs`).
"""
