"""Helpers of the tiers tests: a tiny training state and ways to damage a store."""

from __future__ import annotations

import torch

from ckpt.codecs.delta import referenced_keys
from ckpt.storage.commit import load_manifest
from ckpt.storage.store import Store


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "optim": opt}


def train_step(state: dict, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=g)
    loss = state["model"](x).pow(2).mean()
    state["optim"].zero_grad()
    loss.backward()
    state["optim"].step()


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def keys_of(store: Store, step: int) -> set[str]:
    m = load_manifest(store, step)
    return {k for ref in m.chunk_refs() for k in referenced_keys(ref.to_json())}


def corrupt(store: Store, step: int, only: set[str] | None = None) -> set[str]:
    """Overwrite the objects of ``step`` (those in ``only`` when given) with garbage of the same size."""
    keys = keys_of(store, step) if only is None else only
    for key in keys:
        data = store.get_object(key)
        store.put_object(key, bytes(b ^ 0x5A for b in data) or b"x")
    return keys


def run_steps(durable: str, local: str, steps, **kw) -> dict[int, dict[str, torch.Tensor]]:
    """Train ``steps`` steps through ``Checkpointer(durable, local=local, **kw)``, saving
    each one; returns the weights after each step."""
    import ckpt

    state, seen = make_state(), {}
    with ckpt.Checkpointer(durable, local=local, **kw) as ck:
        for s in steps:
            train_step(state, s)
            seen[s] = weights(state)
            ck.save(state, step=s).wait()
    return seen
