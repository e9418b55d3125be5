"""Ordering: one total order of consortium messages that every member consumes.

Port :class:`~medledger.ledger.ordering.port.Orderer`; adapters ``solo``
(in-process, the embedded default) and ``jetstream`` (a replicated NATS
JetStream stream).
"""
