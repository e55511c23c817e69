"""Read-only commands: ``ckpt ls``, ``show``, ``diff`` and ``verify``."""

from __future__ import annotations

from typing import Any

import click

from ckpt.cli.common import (
    EXIT_CORRUPT,
    console,
    created,
    current_encryption,
    emit_json,
    emit_table,
    fmt_bytes,
    json_option,
    key_options,
    open_store,
    plugins,
    printable,
    progress_bar,
    report_step_errors,
    short,
    storage_option,
)
from ckpt.state import paths as treemod

# -- ls -----------------------------------------------------------------------------------


@click.command("ls")
@click.argument("url")
@json_option
@key_options
@storage_option
def ls_cmd(url: str, as_json: bool, storage_options: dict[str, Any]) -> None:
    """List the checkpoints of the store at URL.

    Per checkpoint: step, created (UTC), tensors, raw (logical tensor bytes), stored
    (bytes of every object it references, shared ones included), ratio (raw / stored
    bytes of those objects), new (bytes that save wrote: new objects + manifest), and
    lineage: "latest" for the checkpoint a load or resume takes (the one committed last,
    not the highest step), "abandoned" for one that a rollback left behind (restore 20
    of 30, save 21: 30 is abandoned; only an explicit step reads it).

    \b
    Examples:
      ckpt ls file:///runs/exp1
      ckpt ls s3://bucket/exp1 -o anon=false --json | jq '.checkpoints[-1].step'

    \b
    JSON schema:
      {"url": str, "latest": int|null,
       "checkpoints": [{"step": int, "created": str, "parent": int|null,
                        "seq": int|null (commit sequence), "run": str|null (writer id),
                        "latest": bool, "abandoned": bool,
                        "tensors": int, "raw_bytes": int, "stored_bytes": int,
                        "ratio": float|null, "new_bytes": int, "manifest_bytes": int}],
       "errors": [{"step": int, "error": str}]}   # unreadable manifests (exit 1)

    Exit codes: 0 ok, 1 a manifest is unreadable, 2 bad URL or empty store.
    """
    from ckpt.cli.report import ls_report

    doc = ls_report(open_store(url, storage_options))
    if as_json:
        emit_json(doc)
    else:
        rows = [
            [
                str(c["step"]),
                created(c["created"]),
                str(c["tensors"]),
                fmt_bytes(c["raw_bytes"]),
                fmt_bytes(c["stored_bytes"]),
                f"{c['ratio']:.2f}x" if c["ratio"] else "-",
                fmt_bytes(c["new_bytes"]),
                "latest" if c["latest"] else ("abandoned" if c["abandoned"] else ""),
            ]
            for c in doc["checkpoints"]
        ]
        cols = [
            ("step", "right"),
            ("created", "left"),
            ("tensors", "right"),
            ("raw", "right"),
            ("stored", "right"),
            ("ratio", "right"),
            ("new", "right"),
            ("lineage", "left"),
        ]
        emit_table(cols, rows)
    report_step_errors(doc)


# -- show ---------------------------------------------------------------------------------


@click.command("show")
@click.argument("url")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
@json_option
@key_options
@storage_option
def show_cmd(url: str, step: int | None, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Show what checkpoint STEP of URL holds: a tree of names with dtype, shape, codec,
    stored bytes and how each tensor's chunks are stored.

    \b
    Status of a tensor:
      new      every chunk written by this save
      dedup    every chunk reused (an earlier checkpoint or another tensor holds it)
      partial  some chunks reused
      delta    a chunk is stored as a delta against the parent (codec with a "parent")

    \b
    Layout of a tensor of a collective save (torch.distributed), a column then:
      replicated   equal on every rank, stored once
      rank:R       rank R's own value (per-rank state: RNG, rank-local values)
      sharded:N    a DTensor (FSDP2, tensor parallel) stored as N shard boxes

    \b
    Examples:
      ckpt show file:///runs/exp1
      ckpt show /runs/exp1 --step 100 --json | jq '.tensors[] | select(.status=="new") | .name'

    \b
    JSON schema:
      {"url": str, "step": int, "created": str, "parent": int|null,
       "seq": int|null, "run": str|null, "abandoned": bool, "world_size": int (0: one process),
       "raw_bytes": int, "stored_bytes": int, "new_bytes": int,
       "adapters": {path: adapter}, "plugins": {name: version}, "meta": {...},
       "tree": <the manifest's encoded tree; tensors as {"$tensor": path}>,
       "tensors": [{"path": str, "name": str (model.0.weight style), "dtype": str,
                    "shape": [int], "nbytes": int, "stored": int, "codec": str,
                    "status": "new"|"dedup"|"partial"|"delta",
                    "layout": ""|"replicated"|"rank:R"|"sharded:N" (a collective save),
                    "chunks": [{"key": str, "size": int, "stored": int,
                                "codec": [str], "dedup": bool, "delta": bool,
                                "shared_with": [int]}]}]}

    Exit codes: 0 ok, 1 unreadable manifest, 2 bad URL, empty store or unknown step.
    """
    from ckpt.cli.report import show_report

    doc = show_report(open_store(url, storage_options), step)
    if as_json:
        emit_json(doc)
        return
    by_path = {t["path"]: t for t in doc["tensors"]}
    head = (
        f"step {doc['step']} of {doc['url']}  created {created(doc['created'])}  parent {doc['parent']}  "
        f"raw {fmt_bytes(doc['raw_bytes'])}  stored {fmt_bytes(doc['stored_bytes'])}  "
        f"new {fmt_bytes(doc['new_bytes'])}"
    )
    out = console()
    if out.is_terminal:
        out.print(_rich_tree(head, doc["tree"], by_path))
        return
    click.echo(head)
    rows = [
        [
            t["name"],
            t["dtype"],
            "x".join(map(str, t["shape"])) or "scalar",
            t["codec"],
            fmt_bytes(t["stored"]),
            t["status"],
            *([t["layout"]] if doc.get("world_size") else []),
        ]
        for t in doc["tensors"]
    ]
    cols = [
        ("name", "left"),
        ("dtype", "left"),
        ("shape", "left"),
        ("codec", "left"),
        ("stored", "right"),
        ("status", "left"),
        *([("layout", "left")] if doc.get("world_size") else []),
    ]
    emit_table(cols, rows)
    from ckpt.cli.report import json_leaves

    leaves = json_leaves(doc["tree"])
    if leaves:
        click.echo("values:")
        for path, value in leaves.items():
            click.echo(f"  {printable(path.replace('/', '.'))} = {short(value)}")


_STATUS_STYLE = {"new": "green", "dedup": "cyan", "partial": "yellow", "delta": "magenta"}


def _rich_tree(head: str, tree: Any, by_path: dict[str, dict]) -> Any:
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(head))

    def tensor_label(key: str, t: dict) -> str:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        style = _STATUS_STYLE.get(t["status"], "white")
        return (
            f"[bold]{escape(printable(key))}[/]  {t['dtype']}{shape}  {escape(t['codec'])}  {fmt_bytes(t['stored'])}  "
            f"[{style}]{t['status']}[/]" + (f"  {t['layout']}" if t.get("layout") else "")
        )

    def add(node: Any, key: str, value: Any) -> None:
        if isinstance(value, dict) and "$tensor" in value:
            t = by_path.get(str(value["$tensor"]))
            node.add(tensor_label(key, t) if t else escape(printable(key)))
            return
        children = treemod.children(value)
        if children is None:
            node.add(f"{escape(printable(key))} [dim]= {escape(short(value))}[/]")
            return
        branch = node.add(f"[bold blue]{escape(printable(key))}[/]")
        for k, v in children:
            add(branch, k, v)

    for k, v in treemod.children(tree) or []:
        add(root, k, v)
    return root


# -- diff ---------------------------------------------------------------------------------


@click.command("diff")
@click.argument("url")
@click.argument("a", type=int)
@click.argument("b", type=int)
@json_option
@key_options
@storage_option
def diff_cmd(url: str, a: int, b: int, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Compare checkpoints A and B of URL: changed, added and removed tensors, the largest
    absolute difference of each changed tensor (both read and verified, one tensor at a time),
    changed non-tensor values, and the stored bytes the two share.

    A tensor is unchanged when its chunks have the same content hashes; only changed tensors
    are read.

    \b
    Examples:
      ckpt diff file:///runs/exp1 100 200
      ckpt diff /runs/exp1 100 200 --json | jq '.changed[] | [.tensor, .max_abs_diff]'

    \b
    JSON schema:
      {"url": str, "a": int, "b": int,
       "changed": [{"tensor": str, "a": {"dtype": str, "shape": [int]},
                    "b": {"dtype": str, "shape": [int]},
                    "max_abs_diff": float|"inf"|null}],   # null: bool, or dtype/shape changed
       "added":   [{"tensor": str, "dtype": str, "shape": [int]}],
       "removed": [{"tensor": str, "dtype": str, "shape": [int]}],
       "unchanged": int,
       "values_changed": [{"path": str, "a": json, "b": json}],  # a/b absent if missing
       "shared": {"objects": int, "stored_bytes": int},
       "stored_bytes": {"a": int, "b": int}}

    Exit codes: 0 ok, 1 corrupt object, 2 bad URL or unknown step.
    """
    from ckpt.cli.report import diff_report

    doc = diff_report(open_store(url, storage_options), plugins(), a, b)
    if as_json:
        emit_json(doc)
        return

    def mad(v: Any) -> str:
        return "-" if v is None else (v if isinstance(v, str) else f"{v:.6g}")

    rows = []
    for c in doc["changed"]:
        sa, sb = c["a"], c["b"]
        kind = (
            f"{sb['dtype']}{sb['shape']}" if sa == sb else f"{sa['dtype']}{sa['shape']} -> {sb['dtype']}{sb['shape']}"
        )
        rows.append(["changed", c["tensor"].replace("/", "."), kind, mad(c["max_abs_diff"])])
    for c in doc["added"]:
        rows.append(["added", c["tensor"].replace("/", "."), f"{c['dtype']}{c['shape']}", "-"])
    for c in doc["removed"]:
        rows.append(["removed", c["tensor"].replace("/", "."), f"{c['dtype']}{c['shape']}", "-"])
    if rows:
        emit_table([("change", "left"), ("tensor", "left"), ("dtype/shape", "left"), ("max|a-b|", "right")], rows)
    for v in doc["values_changed"]:
        old = short(v["a"], 40) if "a" in v else "(absent)"
        new = short(v["b"], 40) if "b" in v else "(absent)"
        click.echo(f"value {printable(v['path'].replace('/', '.'))}: {old} -> {new}")
    sh = doc["shared"]
    click.echo(
        f"step {a} -> {b}: {len(doc['changed'])} changed, {len(doc['added'])} added, {len(doc['removed'])} removed, "
        f"{doc['unchanged']} unchanged tensors; {len(doc['values_changed'])} values changed; "
        f"{sh['objects']} objects ({fmt_bytes(sh['stored_bytes'])}) shared"
    )


# -- verify -------------------------------------------------------------------------------


@click.command("verify")
@click.argument("url")
@click.option("--step", type=int, default=None, help="Verify only this step (default: every step).")
@json_option
@key_options
@storage_option
def verify_cmd(url: str, step: int | None, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Read, decode and hash-check every object of checkpoint STEP (default: every checkpoint).

    Objects shared between checkpoints are read once. Each bad object is named with every
    step and tensor that uses it. Without --step, files in manifests/ that are not a
    manifest (0009.json, 9.json.tmp: ignored by every reader) are reported too.

    \b
    Examples:
      ckpt verify file:///runs/exp1
      ckpt verify s3://bucket/exp1 --step 200 -o anon=false || echo "corrupt!"

    \b
    JSON schema:
      {"url": str, "steps": [int], "objects": int, "bytes": int, "ok": bool,
       "problems": [{"key": str|null (null: the manifest itself), "error": str,
                     "references": [{"step": int, "tensor": str|null}]}]}
      An encrypted store verified without its key adds "authenticated": false,
      "key_id": str and "note": str (presence and sizes checked, nothing authenticated;
      "tensor" is then null).

    An encrypted store needs its key (--key-file, CKPT_KEY_FILE) to authenticate every
    manifest and object; without it, verify checks that every object the manifests' clear
    headers list is present with its recorded size, and says it cannot authenticate.

    Exit codes: 0 every object sound, 1 corruption found, 2 bad URL, empty store, unknown step.
    """
    from ckpt.cli.report import verify_report

    keyless = _encrypted_without_key(url, storage_options)
    with progress_bar("verifying") as update:
        if keyless is not None:  # presence and sizes from the sealed headers; nothing authenticated
            from ckpt.security.audit import check_without_key

            doc = check_without_key(keyless, step, update)
        else:
            doc = verify_report(open_store(url, storage_options), plugins(), step, update)
    if as_json:
        emit_json(doc)
    elif doc["ok"] and keyless is not None:
        click.echo(
            f"NOT AUTHENTICATED: {len(doc['steps'])} checkpoint(s), {doc['objects']} objects present with their "
            f"recorded sizes in {doc['url']}; it is encrypted (key {doc['key_id']}) and no key was given, so ckpt "
            "cannot authenticate them: pass --key-file or CKPT_KEY_FILE"
        )
    elif doc["ok"]:
        click.echo(
            f"OK: {len(doc['steps'])} checkpoint(s), {doc['objects']} objects, "
            f"{fmt_bytes(doc['bytes'])} verified in {doc['url']}"
        )
    else:
        for p in doc["problems"]:
            click.echo(printable(f"BAD {'object ' + p['key'] if p['key'] else 'manifest'}: {p['error']}"))
            for r in p["references"]:
                if r["tensor"] is not None:
                    click.echo(f"    used by step {r['step']} tensor {r['tensor']!r}")
    if not doc["ok"]:
        if keyless is not None and not as_json:
            click.echo("(no key given: ckpt cannot authenticate what is present; pass --key-file to check every byte)")
        click.echo(f"ckpt: error: verification failed: {len(doc['problems'])} bad object(s) in {doc['url']}", err=True)
        raise click.exceptions.Exit(EXIT_CORRUPT)


def _encrypted_without_key(url: str, storage_options: dict[str, Any]) -> Any:
    """The store at ``url`` when it is encrypted and the command was given no key, else None."""
    from ckpt.security.envelope import read_descriptor
    from ckpt.storage.store import Store

    if current_encryption() is not None:
        return None
    store = Store(url, storage_options)
    return store if read_descriptor(store) is not None else None
