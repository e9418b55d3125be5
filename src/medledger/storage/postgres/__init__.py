"""The PostgreSQL backend (psycopg 3, one connection pool per store), for institutions past one box.

``connection`` (DSNs, pools, error mapping, the shared pooled-store base),
``migrations`` (versioned schema steps of each store), ``chain``, ``records``
and ``blobs`` (one adapter each). Every store lives in its own PostgreSQL
schema; see :mod:`medledger.storage.postgres.connection` for durability and
errors.
"""
