"""The records service: FHIR resources stored encrypted, committed on the private chain.

Write (create/update): validate → assign ``id``/``meta`` → seal with a fresh
data key (AES-256-GCM, AAD = institution/type/id/version) → blob store →
index row with the wrapped key and search tokens → ``record.put`` on the
private chain (type, keyed record ref, version, blob hash, patient
pseudonym — never plaintext or PHI). It returns only after the chain commit
is durable; if the commit fails the index row is removed again.

Read: index row → the chain transaction it names (its blob hash, version and
ref must match) → blob (re-hashed) → unwrap the data key → decrypt. Any
mismatch raises :class:`IntegrityError`; erased resources raise :class:`Gone`.

One module per concern, composed by :class:`~.service.RecordsService`:

* ``model`` — what goes in and out: the typed write intent, stored versions, the chain port;
* ``sealing`` — a version's final JSON, ciphertext, index row and ``record.put``;
* ``writes`` — all-or-nothing writes under per-resource locks;
* ``recovery`` — taking back versions a crash or a failed commit left uncommitted;
* ``bundles`` — FHIR ``transaction`` Bundles as one write;
* ``reading`` — every read checked against the chain, blob hash and key;
* ``patients`` — which resources are a patient's, from the pseudonyms alone;
* ``queries`` — search over the blind index;
* ``erasure`` — crypto-shredding with a ``record.erase`` tombstone;
* ``rotation`` — KEK rotation with a ``key.rotate`` entry.
"""
