"""Checking an encrypted store without its key: what ``ckpt verify`` does with no key.

Without the key nothing can be authenticated and no manifest can be read; what can be
checked is the descriptor's form, each sealed manifest's header (its step matches its file
name, it belongs to this store) and that every object a header lists is present with the
stored size it records. :func:`check_without_key` reports that, and says it could not
authenticate. With the key, ``ckpt verify`` opens the store (:func:`ckpt.security.envelope.open_store`)
and authenticates every manifest and object as it reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckpt.errors import CheckpointError, EncryptionError, NoCheckpointError
from ckpt.security.envelope import parse_sealed, read_descriptor

if TYPE_CHECKING:
    from ckpt.storage.store import Store

NOT_AUTHENTICATED = (
    "no key given: presence and sizes checked only; nothing authenticated "
    "(pass the key to authenticate every manifest and object)"
)


def check_without_key(
    store: Store, step: int | None = None, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Presence and sizes of the objects of ``step`` (every step when None) of the encrypted
    ``store``, from the manifests' plain headers; nothing is authenticated.

    Returns the document ``ckpt verify --json`` prints (``verify_report``'s fields), with
    ``"authenticated": false``, ``"key_id"`` and ``"note"`` added. A plain store is an
    :class:`EncryptionError` (verify it the usual way); an unknown step a NoCheckpointError.
    """
    descriptor = read_descriptor(store)
    if descriptor is None:
        raise EncryptionError(f"{store.url} is not encrypted: verify it without a key the usual way")
    steps = store.steps()
    if step is not None:
        if step not in steps:
            raise NoCheckpointError(f"no checkpoint at step {step} in {store.url}")
        steps = [step]
    problems: list[dict[str, Any]] = []
    wanted: dict[str, tuple[int, list[dict[str, Any]]]] = {}
    for s in steps:
        where = f"manifest step {s} of {store.url}"
        try:
            raw = store.read(store.manifest_path(s))
            _head, header, _rest = parse_sealed(raw, where)
            if header["step"] != s:
                raise CheckpointError(f"{where} is sealed as step {header['step']} (copied over another step)")
            if header["store"] != descriptor["store_id"]:
                raise CheckpointError(f"{where} belongs to another store")
        except FileNotFoundError:
            continue  # removed since the listing
        except CheckpointError as exc:
            problems.append({"key": None, "error": str(exc), "references": [{"step": s, "tensor": None}]})
            continue
        for key, stored in header["objects"].items():
            size, refs = wanted.setdefault(key, (stored, []))
            if size < 0 <= stored:
                wanted[key] = (stored, refs)
            refs.append({"step": s, "tensor": None})
    present = {o.key: o.size for o in store.list_objects()}
    total = 0
    for i, (key, (stored, refs)) in enumerate(sorted(wanted.items())):
        if key not in present:
            problems.append({"key": key, "error": f"object {key} is missing from {store.url}", "references": refs})
        elif stored >= 0 and present[key] != stored:
            problems.append(
                {
                    "key": key,
                    "error": f"object {key} has {present[key]} bytes, its manifest says {stored} (truncated or replaced)",
                    "references": refs,
                }
            )
        total += max(stored, 0)
        if progress is not None:
            progress(i + 1, len(wanted))
    return {
        "url": store.url,
        "steps": steps,
        "objects": len(wanted),
        "bytes": total,
        "ok": not problems,
        "problems": problems,
        "authenticated": False,
        "key_id": descriptor["key_id"],
        "note": NOT_AUTHENTICATED,
    }
