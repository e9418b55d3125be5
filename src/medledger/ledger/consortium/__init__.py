"""The consortium chain shared by all member institutions.

* ``member`` — a member's view: validate, cut, vote, finalize (``ConsortiumMember``);
* ``finality`` — the vote count: which cut blocks are final, with which
  certificate, and who equivocated (``Finality``);
* ``rounds`` — when a block of anchors is complete, and the idle notices that
  complete it (``AnchorRounds``, decisions 0053, 0066, 0067);
* ``broadcast_votes`` — votes that came beside the order, held until their
  block is cut (``BroadcastVotes``, decision 0063);
* ``messages`` — the kinds of message in the ordered stream;
* ``rules`` — the deterministic transaction rules every member and auditor applies;
* ``modes`` — which rules a genesis's mode selects (the benchmark-only
  consortium-only mode also orders record transactions);
* ``verify`` — the auditor's policy for ``verify_chain`` over a consortium chain.

The ordering services the members consume are in ``ledger.ordering``.
"""
