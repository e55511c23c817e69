"""Encryption of the local tiers under torch.distributed: every rank's local tier and the
durable tier share ONE descriptor (the same store id and data key), as the two tiers of one
process do (:func:`ckpt.security.binding.open_tiers`), agreed collectively:

1. each rank reads its own local tier's descriptor (:func:`local_descriptor`; none, or
   none while it holds plain checkpoints) and the ranks gather them;
2. rank 0 opens the durable tier with the user's ``Encryption`` (creating a new encrypted
   store's keys, whose descriptor is written at its first persist, under its lease) and
   chooses the descriptor: an existing durable tier's; for a new durable tier the one the
   local tiers hold (all of them the same store), else the new one. A local tier of another
   store id than an existing durable tier, local tiers of different stores, and plain local
   checkpoints while the durable tier is encrypted are refused (:class:`EncryptionError`);
3. the chosen descriptor is sent to every rank (descriptors are public: the data key in it
   is wrapped), which unwraps it with its own ``Encryption`` and binds its durable
   :class:`~ckpt.storage.store.Store` and its local tier to it: a local tier without a
   descriptor takes it, written before its first object by its first local commit.

Each step's outcome is gathered on the Checkpointer's group, so a refusal on any rank is an
:class:`EncryptionError` on every rank and no rank waits for the others.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any

import torch.distributed as dist

from ckpt.errors import EncryptionError
from ckpt.security.binding import raw_descriptor
from ckpt.security.envelope import _attach, _unwrap, keys_of, open_store, read_descriptor
from ckpt.security.keys import Encryption
from ckpt.storage.store import Store

from .exchange import Failed, check_parts, gather_all

#: what a rank tells about its local tier: (store id, descriptor JSON) or None, and whether
#: it holds plain checkpoints
LocalDescriptor = tuple[tuple[str, dict[str, Any]] | None, bool]


def local_descriptor(local: Store) -> LocalDescriptor:
    """This rank's local tier's descriptor (as JSON, the wrapped key in base64) and whether
    it holds plain checkpoints (step 1 of the module docstring)."""
    doc = read_descriptor(local)
    if doc is None:
        return None, bool(local.manifest_listing())
    raw = {**doc, "wrapped": base64.b64encode(doc["wrapped"]).decode()}
    return (doc["store_id"], raw), False


def bind_ranks(
    local: Store, durable: Store, group: Any, encryption: Encryption, locals_: list[LocalDescriptor]
) -> None:
    """Steps 2 and 3 of the module docstring, on every rank of ``group`` (collective);
    ``locals_``: each rank's :func:`local_descriptor`."""
    rank = dist.get_rank(group)
    what = f"binding the encrypted local tiers to {durable.url}"
    err: BaseException | None = None
    chosen: Any = None
    if rank == 0:
        try:
            chosen = _choose(durable, encryption, locals_)
        except BaseException as exc:  # noqa: BLE001 - refused on every rank
            err, chosen = exc, Failed(rank, exc)
    outs = gather_all(group, chosen, what, err)  # rank 0's choice (or refusal) reaches every rank
    check_parts(outs, err, what)
    doc = outs[0]
    err = None
    out: Any = True
    try:
        _bind(local, durable, encryption, doc, locals_[rank][0], rank)
    except BaseException as exc:  # noqa: BLE001 - refused on every rank
        err, out = exc, Failed(rank, exc)
    check_parts(gather_all(group, out, what, err), err, what)


def _choose(durable: Store, encryption: Encryption, locals_: list[LocalDescriptor]) -> dict[str, Any]:
    """On rank 0: open the durable tier and choose the descriptor of every tier (step 2)."""
    dkeys = open_store(durable, encryption, create=True)
    if dkeys is None:  # never: an encryption was given
        raise EncryptionError(f"{durable.url} was opened without encryption")
    plain = [r for r, (_, p) in enumerate(locals_) if p]
    if plain:
        raise EncryptionError(
            f"the local tier of rank {plain[0]} holds plain checkpoints and the durable tier {durable.url} is "
            "encrypted: refusing to mix plain and encrypted checkpoints (delete the local tier)"
        )
    held = {r: d for r, (d, _) in enumerate(locals_) if d is not None}
    if dkeys.pending is None:  # an existing encrypted durable tier: its descriptor
        for r, (sid, _) in held.items():
            if sid != dkeys.store_id.hex():
                raise EncryptionError(
                    f"the local tier of rank {r} is another encrypted store (store id {sid}) than the durable "
                    f"tier {durable.url} (store id {dkeys.store_id.hex()}): the local tier is a cache of the "
                    "durable one; delete it or point local= elsewhere"
                )
        return dict(json.loads(raw_descriptor(durable, dkeys)))
    ids = sorted({sid for sid, _ in held.values()})
    if len(ids) > 1:
        raise EncryptionError(
            f"the local tiers of the ranks are different encrypted stores (store ids {', '.join(ids)}): they "
            "cannot share one durable tier; delete them or point local= elsewhere"
        )
    if not ids:  # new tiers: the new durable tier's descriptor
        assert dkeys.pending is not None
        return dict(dkeys.pending)
    # a new durable tier takes the local tiers' descriptor (written at its first persist)
    doc = next(d for sid, d in held.values())
    keys = _unwrap(_decoded(doc, durable.url), encryption, durable.url)
    _attach(durable, dataclasses.replace(keys, pending=dict(doc)))
    return dict(doc)


def _decoded(doc: Any, url: str) -> dict[str, Any]:
    """A descriptor as JSON (as sent between the ranks) with its wrapped key as bytes."""
    try:
        return {**doc, "wrapped": base64.b64decode(doc["wrapped"], validate=True)}
    except (TypeError, KeyError, ValueError, binascii.Error):
        raise EncryptionError(f"the encryption descriptor chosen for {url} is malformed") from None


def _bind(
    local: Store,
    durable: Store,
    encryption: Encryption,
    doc: dict[str, Any],
    mine: tuple[str, dict[str, Any]] | None,
    rank: int,
) -> None:
    """On each rank: bind its durable Store and its local tier to ``doc`` (step 3)."""
    if rank == 0:
        keys = keys_of(durable)  # opened by _choose, maybe pending (rank 0 writes it)
        if keys is None or keys.store_id.hex() != doc["store_id"]:
            raise EncryptionError(f"{durable.url} was opened as another encrypted store")
    else:
        keys = _unwrap(_decoded(doc, durable.url), encryption, durable.url)
        _attach(durable, dataclasses.replace(keys, pending=None))
    if mine is None:  # written before the local tier's first object, under its lease
        _attach(local, dataclasses.replace(keys, pending=dict(doc)))
        return
    lkeys = open_store(local, encryption)  # its own wrapping of the data key: checked to open
    if lkeys is None or lkeys.store_id != keys.store_id:
        raise EncryptionError(f"the local tier {local.url} is another encrypted store than {durable.url}")
