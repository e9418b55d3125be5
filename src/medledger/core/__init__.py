"""The pure core: encoding, hashing, RFC 6962 Merkle trees, keys, models, errors.

No I/O, no clock, no randomness except key generation; this is the part an
independent auditor re-implements to check medledger.
"""
