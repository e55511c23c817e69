"""What of a Trainer checkpoint is JSON: the ``TrainerState`` and the data-order record.

The ``TrainerState`` is stored as the JSON the Trainer writes to its own
``trainer_state.json`` (one string leaf, ``trainer_state``), so a resume hands the
Trainer back what it would have read from a ``checkpoint-N`` folder. A value in it that
is not JSON (a callback state or trial parameter holding an object) is refused with an
error naming its key, never pickled.

The data-order record (``data``) holds what decides which batches a resumed epoch skips
and in what order the rest come: seeds, batch size, accumulation, dataset length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from ckpt.errors import SchemaError, UnsupportedValueError

TRAINER_STATE_KEY = "trainer_state"
DATA_KEY = "data"
CONFIG_KEY = "model_config"


def _first_non_json(value: Any, path: str) -> tuple[str, Any] | None:
    """Where ``value`` stops being JSON: the path and the offending value (None: all JSON)."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None  # NaN and inf: json writes them and reads them back, as the Trainer does
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):  # json.dumps' own rule
                return f"{path} key {k!r}", k
            found = _first_non_json(v, f"{path}/{k}")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _first_non_json(v, f"{path}/{i}")
            if found:
                return found
        return None
    return path, value


def trainer_state_json(state: Any) -> str:
    """``state`` (a ``TrainerState``) as the JSON of the Trainer's ``trainer_state.json``.

    Compact, and without ``dataclasses.asdict``'s deep copy: this runs on the training
    thread at every save, and the log history grows with every logging step.

    :raises UnsupportedValueError: a field holds a value that is not JSON; names its key.
    """
    doc = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        step = getattr(state, "global_step", "?")
        found = _first_non_json(doc, TRAINER_STATE_KEY)
        if found is None:  # e.g. a mapping whose keys mix types, which sort_keys cannot order
            what = f"step {step}: {TRAINER_STATE_KEY} is not JSON ({exc})"
        else:
            where, value = found
            what = f"step {step}: {where} is a {type(value).__module__}.{type(value).__qualname__}, not JSON"
        raise UnsupportedValueError(
            f"{what}. CkptTrainer stores the TrainerState as JSON (the Trainer's own trainer_state.json) and "
            "pickles nothing: make the value a number, string, list or dict (callback states too)"
        ) from None


def parse_trainer_state(text: Any, *, step: int, url: str) -> dict[str, Any]:
    """The stored ``trainer_state`` string of checkpoint ``step``, checked to be a JSON object."""
    if not isinstance(text, str):
        raise SchemaError(
            f"checkpoint step {step} of {url} holds no {TRAINER_STATE_KEY!r} text: it was not written by CkptTrainer"
        )
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"checkpoint step {step} of {url}: {TRAINER_STATE_KEY} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("global_step"), int):
        raise SchemaError(f"checkpoint step {step} of {url}: {TRAINER_STATE_KEY} is not a TrainerState")
    return doc


def data_record(args: Any, train_batch_size: Any, dataset: Any) -> dict[str, Any]:
    """What fixes the order of the training data and the batches a resume skips."""
    try:
        examples: int | None = len(dataset)
    except TypeError:  # an IterableDataset: the Trainer re-reads it to skip
        examples = None
    record = {
        "seed": args.seed,
        "data_seed": getattr(args, "data_seed", None),
        "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ignore_data_skip": args.ignore_data_skip,
        "examples": examples,
    }
    for name in ("train_sampling_strategy", "group_by_length"):  # 5.x and 4.x spellings
        if hasattr(args, name):
            record[name] = _plain(getattr(args, name))
    return record


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(getattr(value, "value", value))


def data_changes(saved: Any, live: Mapping[str, Any]) -> list[str]:
    """Fields of the data-order record that differ between a checkpoint and the live run."""
    if not isinstance(saved, Mapping):
        return []
    return [
        f"{k} was {saved[k]!r} at save and is {live[k]!r} now"
        for k in sorted(live)
        if k in saved and saved[k] != live[k]
    ]
