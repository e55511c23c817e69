"""A worker process of the hostile-store suite, run by the tests as a subprocess.

``python worker.py fuzz --kind file --count N --seed S --out result.json`` builds a real
store with ckpt.save, then applies N hypothesis-drawn mutations to it one at a time and
reads each mutated store with ``ckpt.load``, ``ckpt.restore``, verification, a
safetensors export and (every few mutations) the ``ckpt verify`` command, then puts the
store back. ``python worker.py cases --out result.json [NAME...]`` runs the named cases
of ``cases.py``.

The process limits its own address space (``--memory``, RLIMIT_AS) before importing
torch, and a mutation that takes longer than ``--hang`` seconds kills it with every
thread's traceback on stderr (faulthandler); the mutation being run is in ``OUT.current``.
The result JSON holds counts, problems (each naming its mutation) and ``maxrss_kb``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import sys
import time
import traceback
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fuzz", "cases"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--kind", default="file", choices=["file", "memory"])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--memory", type=int, default=2 << 30, help="RLIMIT_AS in bytes")
    ap.add_argument("--hang", type=float, default=30.0)
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    faulthandler.enable()
    start, cpu = time.monotonic(), time.process_time()
    if args.mode == "fuzz":
        result = fuzz(args)
    else:
        import cases

        result = cases.run(args.names, args.hang, args.out + ".current")
    result["seconds"] = round(time.monotonic() - start, 2)
    result["cpu_seconds"] = round(time.process_time() - cpu, 2)
    result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    import hostile_env as H
    import mutations as M
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    # small enough that a "huge manifest" mutation costs a megabyte, not 256 MiB per read
    manifest_limit = 1 << 20
    os.environ["CKPT_MAX_MANIFEST_BYTES"] = str(manifest_limit)
    base = H.build_base(args.kind)
    out_dir = os.path.join(base.tmp, "out")
    os.makedirs(out_dir)
    audit = H.OpenAudit()
    originals = {s: H.Oracle(base, body) for s, body in base.manifests.items()}
    for s, oracle in originals.items():
        assert H.same(oracle.tree(), base.reference[s]), "the oracle disagrees with an unmutated load"
    stats: dict[str, Any] = {"mutations": 0, "by_target": {}, "ops": {}, "errors": {}, "changed": 0, "problems": []}
    current = args.out + ".current"

    def problem(m: M.Mutation, op: str, msg: str) -> None:
        stats["problems"].append({"mutation": m.what, "target": m.target, "step": m.step, "op": op, "problem": msg})

    def check(m: M.Mutation, n: int) -> None:
        with open(current, "w") as f:
            f.write(m.what)
        if m.target in ("manifest-json", "manifest-bytes"):
            oracle = H.Oracle(base, m.body)
        else:
            oracle = originals[m.step]
        try:
            expected: Any = oracle.tree()
        except H.Unreadable as exc:
            expected = exc
        ops = [("load", H.load_op), ("verify", H.verify_op), ("export", H.export_op), ("restore", H.restore_op)]
        outcomes = {}
        for name, fn in ops:
            args = (base, m.step, out_dir) if name == "export" else (base, m.step)
            with audit.watch():
                out = H.attempt(lambda fn=fn, args=args: fn(*args))
            outcomes[name] = out
            stats["ops"][name] = stats["ops"].get(name, 0) + 1
            err = out.error
            label = "ok" if err is None else type(err).__name__
            stats["errors"][label] = stats["errors"].get(label, 0) + 1
            samples = stats.setdefault("samples", {}).setdefault(label, [])
            if err is not None and len(samples) < 4:
                samples.append(f"{m.what} | {name}: {str(err)[:240]}")
            bad = audit.outside([base.root, out_dir])
            if bad:
                problem(m, name, f"opened {len(bad)} path(s) outside the store: {sorted(set(bad))[:3]}")
            if err is not None and not isinstance(err, H.ckpt.CheckpointError):
                tb = "".join(traceback.format_exception(err)[-4:])
                problem(m, name, f"escaped {type(err).__name__}: {str(err)[:300]}\n{tb}")
            elif err is not None and "cannot allocate" in str(err):
                problem(m, name, f"tried to allocate: {str(err)[:300]}")
        load = outcomes["load"]
        if load.ok:
            if isinstance(expected, H.Unreadable):
                problem(m, "load", f"loaded a manifest that promises nothing readable ({expected})")
            elif not H.same(load.value, expected):
                problem(m, "load", "silently different data: the load differs from what the manifest promises")
            elif not H.same(load.value, base.reference[m.step]):
                stats["changed"] += 1  # the manifest itself says something else now (see README of the suite)
        verify = outcomes["verify"]
        if verify.ok and verify.value["ok"] and _data_error(load.error):
            problem(m, "verify", f"verify says OK, but load fails: {str(load.error)[:300]}")
        export = outcomes["export"]
        if export.ok:
            for path, t in export.value.items():
                try:
                    want = oracle.tensor(path)
                except H.Unreadable as exc:
                    problem(m, "export", f"exported tensor {path!r} that nothing promises ({exc})")
                    continue
                if not H.same(t, want):
                    problem(m, "export", f"exported tensor {path!r} differs from what the manifest promises")
        restore = outcomes["restore"]
        if restore.ok:
            if isinstance(expected, H.Unreadable):
                problem(m, "restore", f"restored a manifest that promises nothing readable ({expected})")
            else:
                # tensors and modules must hold exactly what the manifest promises; how plain
                # values merge and how an optimizer renumbers and casts its state is restore's
                # own business (errors from them are still checked above)
                for key in H.TENSOR_KEYS:
                    if not H.same(restore.value[key], expected[key]):
                        problem(m, "restore", f"restored {key!r} differs from what the manifest promises")
        if n % 10 == 0:  # the command line too, on a sample
            with audit.watch():
                code, _, err_text = H.run_cli(["verify", base.url, "--step", str(m.step), "--json"])
            stats["ops"]["cli verify"] = stats["ops"].get("cli verify", 0) + 1
            escaped = H.cli_escaped(code, err_text)
            if escaped:
                problem(m, "cli verify", escaped)
            bad = audit.outside([base.root, out_dir])
            if bad:
                problem(m, "cli verify", f"opened outside the store: {sorted(set(bad))[:3]}")

    @settings(
        max_examples=args.count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(args.seed)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        m = M.draw(data, base, manifest_limit)
        t0 = time.monotonic()
        try:
            faulthandler.dump_traceback_later(args.hang, exit=True)
            check(m, stats["mutations"])
        finally:
            took = time.monotonic() - t0
            slowest = stats.setdefault("slowest", [])
            slowest.append((round(took, 3), m.what))
            slowest.sort(reverse=True)
            del slowest[5:]
            faulthandler.cancel_dump_traceback_later()
            m.undo(base)
        stats["mutations"] += 1
        stats["by_target"][m.target] = stats["by_target"].get(m.target, 0) + 1
        if stats["mutations"] % 100 == 0:  # the undo is exact: the store reads as before
            for s in base.manifests:
                assert H.same(H.load_op(base, s), base.reference[s]), f"store not put back after {m.what}"

    one()
    stats["problem_count"] = len(stats["problems"])
    stats["problems"] = stats["problems"][:40]
    return stats


def _data_error(err: BaseException | None) -> bool:
    from ckpt.errors import CorruptCheckpointError, SchemaError

    return isinstance(err, CorruptCheckpointError) and not isinstance(err, SchemaError)


if __name__ == "__main__":
    sys.exit(main())
