"""A whole network on one machine: laptop and test tooling, not part of the product node.

Starts and stops the processes a one-machine network needs (nats-server,
embedded PostgreSQL, one ``medledger node start`` per institution), serves
in-process nodes on loopback sockets, and keeps the ``network.json`` file
that ``medledger network up|status|down`` and ``make demo`` share. An
institution's production node imports none of this.
"""
