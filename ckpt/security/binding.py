"""Encryption across stores: a copy, the two tiers of a Checkpointer, the ranks of a group.

Objects and manifests of an encrypted store are bound to its store id (the associated data,
:mod:`ckpt.security.envelope`), so a store that receives them must hold the same descriptor
(``<root>/encryption.json``: the same store id and data key). Nothing here re-encrypts:

* A copy (:func:`ckpt.storage.copy.copy_stores`) opens the source with the key
  (:func:`open_source`: an encrypted source without a key is refused before anything is read)
  and, under the destination's writer lease, binds the destination (:func:`bind_destination`):
  a destination without a descriptor and without checkpoints gets the source's descriptor,
  verbatim, before the first object; one with the same store id is opened; one with another
  store id (another encrypted store) is refused, and so is mixing plain and encrypted
  checkpoints either way. The copied manifests are resealed with the destination's (same)
  keys, since the copy gives them the destination's commit sequence.
* Tiers (:func:`open_tiers`): the durable tier is opened first; a local tier without a
  descriptor takes the durable tier's (written at its first save, under its lease); a new
  durable tier takes an existing local tier's (written at its first persist). A local tier
  with another store id than an existing durable tier is refused: it is a cache of the
  durable tier, delete it or point ``local=`` elsewhere (it is never replaced silently, so
  nothing committed is lost).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from ckpt.codecs.crypto import SETTING
from ckpt.errors import CorruptCheckpointError, EncryptionError
from ckpt.security.envelope import (
    _DESCRIPTOR_BYTES,
    FILE,
    PLAIN,
    StoreKeys,
    _attach,
    _unwrap,
    keys_of,
    open_store,
    read_descriptor,
)
from ckpt.security.keys import Encryption

if TYPE_CHECKING:
    from ckpt.storage.store import Store

_NO_REENCRYPT = "re-encryption is not supported: copy into a new (empty) store, which takes the source's key"


def raw_descriptor(store: Store, keys: StoreKeys) -> bytes:
    """The bytes of ``store``'s descriptor, checked to be the one of ``keys`` (for a verbatim copy)."""
    raw = store.read(store.path(FILE), limit=_DESCRIPTOR_BYTES + 1)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("store_id") != keys.store_id.hex():
        raise CorruptCheckpointError(f"{FILE} of {store.url} changed while it was being copied")
    return raw


def open_source(src: Store, encryption: Encryption | None) -> StoreKeys | None:
    """Open the source of a copy: with ``encryption``, or as its caller opened it already."""
    current = keys_of(src)
    if current is not None and encryption is None:
        return current
    try:
        return open_store(src, encryption)
    except EncryptionError as exc:
        raise EncryptionError(f"cannot copy {src.url}: {exc}") from None


def bind_destination(src: Store, dst: Store, encryption: Encryption | None) -> None:
    """Give ``dst`` the encryption of ``src`` (opened by :func:`open_source`), under ``dst``'s
    writer lease: see the module docstring."""
    skeys = keys_of(src)
    current = dst.codec_context.settings.get(SETTING)
    if (skeys is None and current == PLAIN) or (
        skeys is not None
        and isinstance(current, StoreKeys)
        and current.pending is None
        and current.store_id == skeys.store_id
    ):
        return  # bound already (a tier persisting again)
    ddoc = read_descriptor(dst)
    if skeys is None:
        if ddoc is not None or isinstance(current, StoreKeys):
            raise EncryptionError(
                f"{dst.url} is encrypted and {src.url} is not: refusing to mix plain and encrypted checkpoints "
                f"({_NO_REENCRYPT})"
            )
        open_store(dst, None)
        return
    if isinstance(current, StoreKeys) and current.store_id != skeys.store_id:
        raise EncryptionError(f"{dst.url} was opened as another encrypted store than {src.url}: {_NO_REENCRYPT}")
    if ddoc is not None and ddoc["store_id"] != skeys.store_id.hex():
        raise EncryptionError(
            f"{dst.url} is another encrypted store (store id {ddoc['store_id']}) than {src.url} "
            f"(store id {skeys.store_id.hex()}): {_NO_REENCRYPT}"
        )
    if ddoc is None:
        if dst.manifest_listing():
            raise EncryptionError(
                f"{dst.url} holds plain checkpoints and {src.url} is encrypted: refusing to mix plain and "
                f"encrypted checkpoints ({_NO_REENCRYPT})"
            )
        dst.write(dst.path(FILE), raw_descriptor(src, skeys))  # before the first object
        dst.sync_dirs()
        _attach(dst, dataclasses.replace(skeys, pending=None))
        return
    if isinstance(current, StoreKeys):  # opened by the caller (a durable tier), maybe pending
        current.pending = None
        return
    # the same store, whose data key the destination may wrap under another key: check it opens
    _attach(dst, _unwrap(ddoc, encryption, dst.url) if encryption is not None else dataclasses.replace(skeys))


def open_tiers(local: Store, durable: Store, encryption: Encryption | None) -> None:
    """Open the two tiers of a Checkpointer with one descriptor: see the module docstring."""
    dkeys = open_store(durable, encryption, create=True)
    if dkeys is None:
        open_store(local, None, create=True)
        return
    assert encryption is not None
    ldoc = read_descriptor(local)
    if ldoc is None:
        if local.manifest_listing():
            raise EncryptionError(
                f"the local tier {local.url} holds plain checkpoints and the durable tier {durable.url} is "
                "encrypted: refusing to mix plain and encrypted checkpoints (delete the local tier)"
            )
        pending = dkeys.pending
        if pending is None:
            pending = json.loads(raw_descriptor(durable, dkeys))
        _attach(local, dataclasses.replace(dkeys, pending=dict(pending)))
        return
    lkeys = open_store(local, encryption)
    assert lkeys is not None
    if lkeys.store_id == dkeys.store_id:
        return
    if dkeys.pending is not None:  # a new durable tier: it takes the local tier's descriptor
        _attach(durable, dataclasses.replace(lkeys, pending=json.loads(raw_descriptor(local, lkeys))))
        return
    raise EncryptionError(
        f"the local tier {local.url} is another encrypted store (store id {lkeys.store_id.hex()}) than the "
        f"durable tier {durable.url} (store id {dkeys.store_id.hex()}): the local tier is a cache of the "
        "durable one; delete it or point local= elsewhere"
    )
