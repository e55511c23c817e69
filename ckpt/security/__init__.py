"""Confidential checkpoints: authenticated encryption at rest (issue 15).

- :mod:`ckpt.security.keys`: the :class:`KeyProvider` protocol, :class:`StaticKeyProvider` and
  :class:`Encryption`, the object users pass as ``encryption=``.
- :mod:`ckpt.security.envelope`: the store-level envelope: a random data key per store, wrapped
  by the provider and recorded in ``<root>/encryption.json``; subkeys derived from it; manifest
  envelopes; key rotation (:func:`~ckpt.security.envelope.rewrap`).
- :mod:`ckpt.codecs.crypto`: the AES-256-GCM codec stage, last in every chain of an encrypted store.

This package's ``__init__`` imports nothing, so importing one submodule stays cheap.
"""
