"""The tiers' checks on what they hold: which tier a local store belongs to, and which
tier's latest checkpoint is newer when the nodes' clocks disagree (see :mod:`ckpt.storage.tiers`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any

from ckpt.errors import CheckpointError, CorruptCheckpointError, NoCheckpointError
from ckpt.storage.copy import same_checkpoint
from ckpt.storage.lineage import parse_manifest
from ckpt.storage.manifest import Manifest
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")


def created(manifest: Manifest) -> float:
    try:
        stamp = _dt.datetime.strptime(manifest.created, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        try:
            stamp = _dt.datetime.fromisoformat(manifest.created.replace("Z", "+00:00")).replace(tzinfo=None)
        except ValueError:
            return 0.0
    return stamp.replace(tzinfo=_dt.timezone.utc).timestamp()


#: parent links followed to tell whether one tier's latest descends from the other's
MAX_HOPS = 64


def _descends(store: Store, manifest: Manifest, ancestor: Manifest, *, need_copy: bool) -> bool:
    """Whether ``manifest``'s parent chain in ``store`` reaches ``ancestor`` (by step; where
    ``store`` holds that step, its copy must be the same checkpoint; ``need_copy``: it must hold it)."""
    m = manifest
    for _ in range(MAX_HOPS):
        parent = m.parent
        if parent is None or parent < ancestor.step:
            return False
        try:
            held = parse_manifest(store.read_manifest(parent), parent, store.url)
        except NoCheckpointError:
            return parent == ancestor.step and not need_copy
        except CheckpointError:
            return False
        if parent == ancestor.step:
            return same_checkpoint(held, ancestor)
        m = held
    return False


def ahead(local: Store, durable: Store, latests: dict[str, Manifest]) -> str | None:
    """The tier whose latest checkpoint descends from the other's, when ``created`` (clocks of
    different nodes) ranks them the other way; None otherwise."""
    lo, du = latests.get("local"), latests.get("durable")
    if lo is None or du is None or lo.step == du.step:
        return None
    if (
        created(du) >= created(lo)
        and lo.step > du.step
        # a restart on a node whose clock is behind: the local tier continues the durable
        # checkpoint it was restored from (which it does not hold)
        and _descends(local, lo, du, need_copy=False)
    ):
        log.warning(
            "restore: step %d of the local tier descends from step %d of the durable tier, created later "
            "by its clock (clock skew between nodes): the local one is newer",
            lo.step,
            du.step,
        )
        return "local"
    if (
        created(lo) > created(du)
        and du.step > lo.step
        # a stale local tier written on a node whose clock was ahead
        and _descends(durable, du, lo, need_copy=True)
    ):
        log.warning(
            "restore: step %d of the durable tier descends from step %d of the local tier, created later "
            "by its clock (clock skew between nodes): the durable one is newer",
            du.step,
            lo.step,
        )
        return "durable"
    return None


#: the local tier's record of the durable tier it caches (see :func:`_bind`)
TIER_MARK = "tier.json"


def bind(local: Store, durable: Store, *, extra: dict[str, Any] | None = None) -> None:
    """Bind the local tier to its durable tier, refusing a local tier left by another run.

    A node-local path reused by a new job with another durable tier would otherwise be
    restored from (its checkpoints may even be newer) and persisted into the new run's
    durable tier: a foreign run silently taken over. The local tier records its durable
    URL in ``tier.json`` on first use; a different one there is a :class:`CheckpointError`
    (use another local path, or empty that one) while it holds checkpoints. A local tier
    without the record that already holds checkpoints is adopted, with a warning. ``extra``
    is recorded too (a rank's local tier: its world size and rank), never checked here.
    """
    path = local.path(TIER_MARK)
    try:
        raw = local.read(path, limit=64 * 1024)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        try:
            doc = json.loads(raw)
            bound = doc["durable"]
            if not isinstance(bound, str):
                raise TypeError(type(bound).__name__)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{path} of the local tier {local.url} is malformed ({exc!r})") from None
        if bound == durable.url:
            if all(doc.get(k) == v for k, v in (extra or {}).items()):
                return
            # the same run at another world size: its checkpoints there are never restored
            # (each records its world size and rank), retention drops them
            log.info("the local tier %s was used with %.300s before: recording %s", local.url, doc, extra)
        elif local.manifest_listing():
            raise CheckpointError(
                f"the local tier {local.url} belongs to the durable tier {bound[:512]!r}, not {durable.url}: "
                "it holds another run's checkpoints; use another local path (or empty that one)"
            )
        else:
            log.info(
                "the local tier %s (of %s before) holds no checkpoint: binding it to %s",
                local.url,
                bound[:512],
                durable.url,
            )
    elif local.manifest_listing():
        log.warning(
            "the local tier %s holds checkpoints but no record of its durable tier: adopting it for %s",
            local.url,
            durable.url,
        )
    local.write(path, json.dumps({"durable": durable.url, **(extra or {})}).encode())
