"""A checkpoint saved here restores in a brand-new Python process (nothing shared but
the files), and training continues there bit-identically to this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import ckpt

# Builds the same training run in parent and child; no state leaks in through imports.
TRAINING = textwrap.dedent(
    """
    import random, numpy as np, torch, ckpt

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.BatchNorm1d(24), torch.nn.GELU(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(24, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return {"model": model, "optim": opt, "sched": sched, "rng": ckpt.RNG(),
                "gen": torch.Generator().manual_seed(seed), "meta": {"epoch": 0, "name": "run"}}

    def train(run, steps):
        out = []
        for _ in range(steps):
            x = torch.randn(8, 10, generator=run["gen"]) + float(np.random.rand()) + random.random()
            loss = run["model"](x).square().mean()
            loss.backward()
            run["optim"].step()
            run["optim"].zero_grad()
            run["sched"].step()
            run["meta"]["epoch"] += 1
            out.append(loss.item().hex())
        return out

    def fingerprint(run):
        import hashlib
        h = hashlib.sha256()
        for name, t in run["model"].state_dict().items():
            h.update(name.encode()); h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for pid, s in sorted(run["optim"].state_dict()["state"].items()):
            for k, v in sorted(s.items()):
                h.update(f"{pid}{k}".encode()); h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    """
)

CHILD = TRAINING + textwrap.dedent(
    """
    import json, sys
    url = sys.argv[1]
    run = make(seed=999)          # different init, different RNG positions
    info = ckpt.restore(url, run)
    losses = train(run, 4)
    tree = ckpt.load(url)
    print(json.dumps({"step": info.step, "epoch_after": run["meta"]["epoch"], "losses": losses,
                      "fingerprint": fingerprint(run), "loaded_keys": sorted(tree),
                      "loaded_bias": tree["model"]["4.bias"].tolist()}))
    """
)


def _namespace():
    ns: dict = {}
    exec(compile(TRAINING, "<training>", "exec"), ns)
    return ns


def test_fresh_process_restores_and_continues_bit_identically(tmp_path):
    ns = _namespace()
    url = str(tmp_path / "run dir")  # a plain local path, with a space
    run = ns["make"](0)
    ns["train"](run, 3)
    ckpt.save(url, run, step=3)
    expected_losses = ns["train"](run, 4)
    expected_fp = ns["fingerprint"](run)

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env["PYTHONPATH"] = str(Path(ckpt.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["step"] == 3 and out["epoch_after"] == 7
    assert out["losses"] == expected_losses
    assert out["fingerprint"] == expected_fp
    assert out["loaded_keys"] == ["gen", "meta", "model", "optim", "rng", "sched"]
    saved_bias = ckpt.load(url)["model"]["4.bias"]
    assert torch.equal(torch.tensor(out["loaded_bias"]), saved_bias)


def test_child_saves_parent_restores(tmp_path):
    ns = _namespace()
    url = f"file://{tmp_path}/store"
    script = tmp_path / "saver.py"
    script.write_text(
        TRAINING
        + textwrap.dedent(
            """
            import sys
            run = make(5)
            train(run, 2)
            ckpt.save(sys.argv[1], run, step=2)
            print(fingerprint(run))
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = ns["make"](0)
    assert ckpt.restore(url, run).step == 2
    assert ns["fingerprint"](run) == proc.stdout.strip()
    assert run["meta"] == {"epoch": 2, "name": "run"}
