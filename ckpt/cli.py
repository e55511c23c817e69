"""The ``ckpt`` command line: inspect, diff, verify, export, import and collect checkpoint stores.

Output: rich tables and trees on a terminal, plain aligned text when piped, and with
``--json`` one JSON document whose schema each command's ``--help`` documents (keys are
only ever added). Progress bars go to stderr, and only when it is a terminal. Rich's
own ``TTY_COMPATIBLE=1`` / ``TTY_COMPATIBLE=0`` force either style.

Exit codes: 0 ok; 1 corruption or verification failure; 2 usage error, not found (bad
URL, empty store, unknown step, missing file) or any other failure. Errors are one line
on stderr; ``ckpt --debug ...`` prints the traceback too.

Plugins add subcommands by implementing ``ckpt_register_commands(cli)`` and calling
``cli.add_command(...)``; :func:`build_cli` calls that hook on every fresh root group.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from typing import Any, Callable, Iterator

import click

from ckpt.errors import CheckpointError, CorruptCheckpointError, PluginError

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2

_EXIT_HELP = """\b
Exit codes: 0 ok, 1 corruption or verification failure, 2 usage error,
not found (bad URL, empty store, unknown step) or other failure."""


# -- options ----------------------------------------------------------------------------


def parse_value(raw: str) -> Any:
    """``true``/``false`` -> bool, an integer -> int, anything else stays a string."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(raw)
    except ValueError:
        return raw


def parse_storage_options(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs -> a ``storage_options`` dict; ``a.b=v`` nests as ``{"a": {"b": v}}``."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--storage-option'")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(f"{key!r} nests under {part!r}, which already has a value",
                                         param_hint="'--storage-option'")  # fmt: skip
            node = child
        node[parts[-1]] = parse_value(raw)
    return out


def _so_callback(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    return parse_storage_options(value)


storage_option = click.option(
    "--storage-option",
    "-o",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_so_callback,
    help="fsspec storage option for the store URL (repeatable): true/false and integers are parsed, "
    "anything else is a string; KEY a.b nests. E.g. -o anon=false -o client_kwargs.endpoint_url=http://...",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema below).")


# -- output helpers -----------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(file=sys.stderr if stderr else sys.stdout, stderr=stderr, highlight=False)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _created(s: str) -> str:
    return s.replace("T", " ")[:19] if s else "-"


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def emit_table(columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; aligned plain text (header line, two-space gaps) otherwise."""
    console = _console()
    if console.is_terminal:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for name, justify in columns:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    if title:
        click.echo(title)
    widths = [max([len(name), *(len(r[i]) for r in rows)]) for i, (name, _) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if j == "right" else c.ljust(w) for c, w, (_, j) in zip(cells, widths, columns)]
        return "  ".join(out).rstrip()

    click.echo(line([name for name, _ in columns]))
    for row in rows:
        click.echo(line(row))


@contextlib.contextmanager
def progress_bar(description: str, *, unit: str = "bytes") -> Iterator[Callable[[int, int], None]]:
    """``update(advance, total)``; a rich bar on stderr when it is a terminal, else a no-op."""
    console = _console(stderr=True)
    if not console.is_terminal:
        yield lambda _advance, _total: None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)  # fmt: skip

    extra = [DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    with Progress(TextColumn("{task.description}"), BarColumn(), *extra, TimeRemainingColumn(), console=console,
                  transient=True) as bar:  # fmt: skip
        task = bar.add_task(description, total=None)
        yield lambda advance, total: bar.update(task, advance=advance, total=total)


# -- the root group -----------------------------------------------------------------------


class CkptGroup(click.Group):
    """Root group: turns ckpt errors into one line on stderr and an exit code."""

    sealed = False

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if self.sealed and name in self.commands:
            raise PluginError(f"a plugin tried to replace the built-in command 'ckpt {name}'")
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CheckpointError as exc:
            code = EXIT_CORRUPT if isinstance(exc, CorruptCheckpointError) else EXIT_USAGE
            _fail(ctx, str(exc), code)
        except OSError as exc:
            _fail(ctx, f"{type(exc).__name__}: {exc}", EXIT_USAGE)
        except Exception as exc:  # a bug: still one line unless --debug
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_USAGE)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if ctx.params.get("debug"):
        traceback.print_exc()
    click.echo("ckpt: error: " + " ".join(message.split()), err=True)
    ctx.exit(code)


ROOT_HELP = f"""Inspect, verify, diff, export, import and garbage-collect ckpt checkpoint stores.

A store is any fsspec URL or local path (file:///runs/a, s3://bucket/run, memory://x);
pass backend options with --storage-option KEY=VALUE.

\b
Examples:
  ckpt ls file:///runs/exp1
  ckpt show /runs/exp1 --step 200
  ckpt verify s3://bucket/exp1 -o anon=false
  ckpt export /runs/exp1 model.safetensors --key model

{_EXIT_HELP}

Plugins add subcommands through the ckpt_register_commands(cli) hook.
"""


def _make_root() -> CkptGroup:
    from ckpt import __version__

    @click.group(cls=CkptGroup, help=ROOT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
    @click.version_option(__version__, prog_name="ckpt")
    def root(debug: bool) -> None:
        pass

    for cmd in COMMANDS:
        root.add_command(cmd)
    root.sealed = True  # type: ignore[attr-defined]
    return root  # type: ignore[return-value]


def build_cli() -> CkptGroup:
    """A fresh root group with the built-in commands and every plugin's subcommands."""
    from ckpt.plugins import get_plugins

    root = _make_root()
    get_plugins().register_commands(cli=root)
    return root


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ckpt = "ckpt.cli:main"``)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        root = build_cli()
    except CheckpointError as exc:
        if debug:
            traceback.print_exc()
        click.echo("ckpt: error: " + " ".join(str(exc).split()), err=True)
        sys.exit(EXIT_USAGE)
    try:
        root.main(args=argv, prog_name="ckpt")
    except BrokenPipeError:  # `ckpt ls ... | head`
        sys.stderr.close()
        sys.exit(EXIT_OK)


def _store(url: str, storage_options: dict[str, Any]) -> Any:
    from ckpt.store import Store

    return Store(url, storage_options)


def _plugins() -> Any:
    from ckpt.plugins import get_plugins

    return get_plugins()


# -- ls -----------------------------------------------------------------------------------


@click.command("ls")
@click.argument("url")
@json_option
@storage_option
def ls_cmd(url: str, as_json: bool, storage_options: dict[str, Any]) -> None:
    """List the checkpoints of the store at URL.

    Per checkpoint: step, created (UTC), tensors, raw (logical tensor bytes), stored
    (bytes of every object it references, shared ones included), ratio (raw / stored
    bytes of those objects), new (bytes that save wrote: new objects + manifest).

    \b
    Examples:
      ckpt ls file:///runs/exp1
      ckpt ls s3://bucket/exp1 -o anon=false --json | jq '.checkpoints[-1].step'

    \b
    JSON schema:
      {"url": str,
       "checkpoints": [{"step": int, "created": str, "parent": int|null,
                        "tensors": int, "raw_bytes": int, "stored_bytes": int,
                        "ratio": float|null, "new_bytes": int, "manifest_bytes": int}],
       "errors": [{"step": int, "error": str}]}   # unreadable manifests (exit 1)

    Exit codes: 0 ok, 1 a manifest is unreadable, 2 bad URL or empty store.
    """
    from ckpt.report import ls_report

    doc = ls_report(_store(url, storage_options))
    if as_json:
        emit_json(doc)
    else:
        rows = [
            [str(c["step"]), _created(c["created"]), str(c["tensors"]), fmt_bytes(c["raw_bytes"]),
             fmt_bytes(c["stored_bytes"]), f"{c['ratio']:.2f}x" if c["ratio"] else "-", fmt_bytes(c["new_bytes"])]
            for c in doc["checkpoints"]
        ]  # fmt: skip
        cols = [("step", "right"), ("created", "left"), ("tensors", "right"), ("raw", "right"),
                ("stored", "right"), ("ratio", "right"), ("new", "right")]  # fmt: skip
        emit_table(cols, rows)
    for e in doc["errors"]:
        click.echo(f"ckpt: error: step {e['step']}: {e['error']}", err=True)
    if doc["errors"]:
        raise click.exceptions.Exit(EXIT_CORRUPT)


# -- show ---------------------------------------------------------------------------------


@click.command("show")
@click.argument("url")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the newest).")
@json_option
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
    Examples:
      ckpt show file:///runs/exp1
      ckpt show /runs/exp1 --step 100 --json | jq '.tensors[] | select(.status=="new") | .name'

    \b
    JSON schema:
      {"url": str, "step": int, "created": str, "parent": int|null,
       "raw_bytes": int, "stored_bytes": int, "new_bytes": int,
       "adapters": {path: adapter}, "plugins": {name: version}, "meta": {...},
       "tree": <the manifest's encoded tree; tensors as {"$tensor": path}>,
       "tensors": [{"path": str, "name": str (model.0.weight style), "dtype": str,
                    "shape": [int], "nbytes": int, "stored": int, "codec": str,
                    "status": "new"|"dedup"|"partial"|"delta",
                    "chunks": [{"key": str, "size": int, "stored": int,
                                "codec": [str], "dedup": bool, "delta": bool,
                                "shared_with": [int]}]}]}

    Exit codes: 0 ok, 1 unreadable manifest, 2 bad URL, empty store or unknown step.
    """
    from ckpt.report import show_report

    doc = show_report(_store(url, storage_options), step)
    if as_json:
        emit_json(doc)
        return
    by_path = {t["path"]: t for t in doc["tensors"]}
    head = (f"step {doc['step']} of {doc['url']}  created {_created(doc['created'])}  parent {doc['parent']}  "
            f"raw {fmt_bytes(doc['raw_bytes'])}  stored {fmt_bytes(doc['stored_bytes'])}  "
            f"new {fmt_bytes(doc['new_bytes'])}")  # fmt: skip
    console = _console()
    if console.is_terminal:
        console.print(_rich_tree(head, doc["tree"], by_path))
        return
    click.echo(head)
    rows = [
        [t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["codec"], fmt_bytes(t["stored"]),
         t["status"]]
        for t in doc["tensors"]
    ]  # fmt: skip
    cols = [("name", "left"), ("dtype", "left"), ("shape", "left"), ("codec", "left"), ("stored", "right"),
            ("status", "left")]  # fmt: skip
    emit_table(cols, rows)
    from ckpt.report import json_leaves

    leaves = json_leaves(doc["tree"])
    if leaves:
        click.echo("values:")
        for path, value in leaves.items():
            click.echo(f"  {path.replace('/', '.')} = {_short(value)}")


_STATUS_STYLE = {"new": "green", "dedup": "cyan", "partial": "yellow", "delta": "magenta"}


def _rich_tree(head: str, tree: Any, by_path: dict[str, dict]) -> Any:
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(head))

    def tensor_label(key: str, t: dict) -> str:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        style = _STATUS_STYLE.get(t["status"], "white")
        return (f"[bold]{escape(key)}[/]  {t['dtype']}{shape}  {escape(t['codec'])}  {fmt_bytes(t['stored'])}  "
                f"[{style}]{t['status']}[/]")  # fmt: skip

    def add(node: Any, key: str, value: Any) -> None:
        if isinstance(value, dict) and "$tensor" in value:
            t = by_path.get(str(value["$tensor"]))
            node.add(tensor_label(key, t) if t else escape(key))
            return
        children = _children(value)
        if children is None:
            node.add(f"{escape(key)} [dim]= {escape(_short(value))}[/]")
            return
        branch = node.add(f"[bold blue]{escape(key)}[/]")
        for k, v in children:
            add(branch, k, v)

    for k, v in _children(tree) or []:
        add(root, k, v)
    return root


def _children(value: Any) -> list[tuple[str, Any]] | None:
    """Named children of an encoded tree node, or None for a leaf value."""
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return None
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "$map" in value and isinstance(value["$map"], list):
            return [(str(p[0]), p[1]) for p in value["$map"] if isinstance(p, list) and len(p) == 2]
        if "$tuple" in value and isinstance(value["$tuple"], list):
            return _children(value["$tuple"])
        if any(k.startswith("$") for k in value):
            return None
        return list(value.items())
    return None


# -- diff ---------------------------------------------------------------------------------


@click.command("diff")
@click.argument("url")
@click.argument("a", type=int)
@click.argument("b", type=int)
@json_option
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
    from ckpt.report import diff_report

    doc = diff_report(_store(url, storage_options), _plugins(), a, b)
    if as_json:
        emit_json(doc)
        return

    def mad(v: Any) -> str:
        return "-" if v is None else (v if isinstance(v, str) else f"{v:.6g}")

    rows = []
    for c in doc["changed"]:
        sa, sb = c["a"], c["b"]
        kind = f"{sb['dtype']}{sb['shape']}" if sa == sb else f"{sa['dtype']}{sa['shape']} -> {sb['dtype']}{sb['shape']}"
        rows.append(["changed", c["tensor"].replace("/", "."), kind, mad(c["max_abs_diff"])])
    for c in doc["added"]:
        rows.append(["added", c["tensor"].replace("/", "."), f"{c['dtype']}{c['shape']}", "-"])
    for c in doc["removed"]:
        rows.append(["removed", c["tensor"].replace("/", "."), f"{c['dtype']}{c['shape']}", "-"])
    if rows:
        emit_table([("change", "left"), ("tensor", "left"), ("dtype/shape", "left"), ("max|a-b|", "right")], rows)
    for v in doc["values_changed"]:
        old = _short(v["a"], 40) if "a" in v else "(absent)"
        new = _short(v["b"], 40) if "b" in v else "(absent)"
        click.echo(f"value {v['path'].replace('/', '.')}: {old} -> {new}")
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
@storage_option
def verify_cmd(url: str, step: int | None, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Read, decode and hash-check every object of checkpoint STEP (default: every checkpoint).

    Objects shared between checkpoints are read once. Each bad object is named with every
    step and tensor that uses it.

    \b
    Examples:
      ckpt verify file:///runs/exp1
      ckpt verify s3://bucket/exp1 --step 200 -o anon=false || echo "corrupt!"

    \b
    JSON schema:
      {"url": str, "steps": [int], "objects": int, "bytes": int, "ok": bool,
       "problems": [{"key": str|null (null: the manifest itself), "error": str,
                     "references": [{"step": int, "tensor": str|null}]}]}

    Exit codes: 0 every object sound, 1 corruption found, 2 bad URL, empty store, unknown step.
    """
    from ckpt.report import verify_report

    store = _store(url, storage_options)
    with progress_bar("verifying") as update:
        doc = verify_report(store, _plugins(), step, update)
    if as_json:
        emit_json(doc)
    elif doc["ok"]:
        click.echo(f"OK: {len(doc['steps'])} checkpoint(s), {doc['objects']} objects, "
                   f"{fmt_bytes(doc['bytes'])} verified in {doc['url']}")  # fmt: skip
    else:
        for p in doc["problems"]:
            click.echo(f"BAD {'object ' + p['key'] if p['key'] else 'manifest'}: {p['error']}")
            for r in p["references"]:
                if r["tensor"] is not None:
                    click.echo(f"    used by step {r['step']} tensor {r['tensor']!r}")
    if not doc["ok"]:
        click.echo(f"ckpt: error: verification failed: {len(doc['problems'])} bad object(s) in {doc['url']}", err=True)
        raise click.exceptions.Exit(EXIT_CORRUPT)


# -- export / import ----------------------------------------------------------------------


@click.command("export")
@click.argument("url")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the newest).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch"]), default=None,
              help="Output format (default: from OUT's suffix: .safetensors; .pt .pth .bin .ckpt = torch).")  # fmt: skip
@click.option("--key", default=None, help="Export only this top-level key (e.g. model), without its prefix.")
@json_option
@storage_option
def export_cmd(url: str, out: str, step: int | None, fmt: str | None, key: str | None, as_json: bool,
               storage_options: dict[str, Any]) -> None:  # fmt: skip
    """Export checkpoint STEP of URL to the file OUT, bit-exact, every dtype.

    \b
    safetensors: flattened PyTorch names (model.0.weight, optim.state.0.exp_avg);
      non-tensor values go into the header metadata as JSON (key "ckpt"), so
      `ckpt import` rebuilds the checkpoint exactly. Streaming: chunks are decoded
      and written in order, a few chunks in memory at a time.
    torch: a nested dict {"model": state_dict, "optim": optimizer state_dict, ...}
      for torch.load(OUT, weights_only=True) and load_state_dict. torch.save needs
      every tensor at once: memory holds one copy of the checkpoint's tensors (its
      raw size). NumPy arrays are written as tensors.

    With --key model only that sub-tree is written, named as its own state dict
    (0.weight), so model.load_state_dict(load_file(OUT)) works directly.

    \b
    Examples:
      ckpt export file:///runs/exp1 model.safetensors --key model
      ckpt export /runs/exp1 full.pt --step 200
      ckpt export s3://bucket/exp1 out.bin --format torch -o anon=false

    \b
    JSON schema:
      {"url": str, "step": int, "out": str, "format": "safetensors"|"torch",
       "tensors": int, "raw_bytes": int, "file_bytes": int}

    Exit codes: 0 ok, 1 corrupt object (nothing written), 2 bad URL, unknown step or key, bad OUT.
    """
    import dataclasses

    from ckpt.export import export_checkpoint

    with progress_bar("exporting") as update:
        res = export_checkpoint(url, out, step=step, fmt=fmt, key=key, storage_options=storage_options,
                                progress=update)  # fmt: skip
    if as_json:
        emit_json(dataclasses.asdict(res))
    else:
        click.echo(f"exported step {res.step} of {res.url} to {res.out} ({res.format}, {res.tensors} tensors, "
                   f"{fmt_bytes(res.raw_bytes)} of tensor data, file {fmt_bytes(res.file_bytes)})")  # fmt: skip


def _adapter_pairs(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in value:
        key, sep, name = item.partition("=")
        if not sep or not key or not name:
            raise click.BadParameter(f"expected KEY=ADAPTER, got {item!r}", param_hint="'--adapter'")
        out[key] = name
    return out


@click.command("import")
@click.argument("src", type=click.Path(exists=True))
@click.argument("url")
@click.option("--step", type=int, required=True, help="Step to store the imported state as.")
@click.option("--adapter", "adapters", multiple=True, metavar="KEY=ADAPTER", callback=_adapter_pairs,
              help="Record top-level KEY as saved by ADAPTER (e.g. model=torch.nn.Module, "
                   "optim=torch.optim.Optimizer) so ckpt.restore loads it into live objects.")  # fmt: skip
@json_option
@storage_option
def import_cmd(src: str, url: str, step: int, adapters: dict[str, str], as_json: bool,
               storage_options: dict[str, Any]) -> None:  # fmt: skip
    """Import SRC into the store at URL as checkpoint STEP (deduplicated against the newest).

    \b
    SRC may be:
      a torch.save file      loaded with torch.load(weights_only=True, mmap=True): never
                             unpickles arbitrary objects; a mapping of names to state
      a .safetensors file    read tensor by tensor; a file from `ckpt export` comes back
                             exactly, any other keeps its flat names (model.0.weight)
      a DCP directory        torch.distributed.checkpoint, read with DCP's FileSystemReader
                             in batches; non-tensor entries with weights_only=True
    Tensors stream into the store with at most ~256 MiB in flight.

    \b
    Examples:
      ckpt import model.pt file:///runs/imported --step 0 --adapter model=torch.nn.Module
      ckpt import model.safetensors /runs/hf --step 0
      ckpt import /ckpts/dcp_step_1000 s3://bucket/run --step 1000 -o anon=false

    \b
    JSON schema:
      {"src": str, "kind": "torch"|"safetensors"|"dcp", "url": str, "step": int,
       "tensors": int, "raw_bytes": int, "stored_bytes": int}

    Exit codes: 0 ok, 2 unreadable or unsafe SRC, bad URL or option.
    """
    import dataclasses

    from ckpt.export import import_checkpoint

    with progress_bar("importing") as update:
        res = import_checkpoint(src, url, step=step, adapters=adapters, storage_options=storage_options,
                                progress=update)  # fmt: skip
    if as_json:
        emit_json(dataclasses.asdict(res))
    else:
        click.echo(f"imported {res.src} ({res.kind}) as step {res.step} of {res.url}: {res.tensors} tensors, "
                   f"{fmt_bytes(res.raw_bytes)} raw, {fmt_bytes(res.stored_bytes)} written")  # fmt: skip


# -- gc / du ------------------------------------------------------------------------------


@click.command("gc")
@click.argument("url")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Keep the newest N checkpoints.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None,
              help="Also keep every checkpoint whose step is a multiple of M.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Report what would be removed; delete nothing.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=None,
              help="Never delete objects younger than this (default CKPT_GC_GRACE_SECONDS, 900): "
                   "they may belong to a save in flight.")  # fmt: skip
@json_option
@storage_option
def gc_cmd(url: str, keep_last: int, keep_every: int | None, dry_run: bool, grace_seconds: float | None,
           as_json: bool, storage_options: dict[str, Any]) -> None:  # fmt: skip
    """Delete the checkpoints a retention policy drops, then sweep unreferenced objects.

    Kept: the newest --keep-last N, every step divisible by --keep-every M, steps held by a
    live lease, always the newest. Mark and sweep from the kept manifests (delta parents
    included); objects younger than the grace period are never swept.

    \b
    Examples:
      ckpt gc file:///runs/exp1 --keep-last 3 --dry-run
      ckpt gc s3://bucket/exp1 --keep-last 2 --keep-every 1000 -o anon=false

    \b
    JSON schema:
      {"url": str, "grace_seconds": float, "dry_run": bool, "kept_steps": [int],
       "removed_steps": [int], "removed_objects": int, "freed_bytes": int}

    Exit codes: 0 ok, 1 a kept manifest is unreadable (nothing deleted), 2 bad URL or option.
    """
    from ckpt.gc import collect

    store = _store(url, storage_options)
    if not store.steps():
        raise _no_checkpoint(store)
    with _gc_progress() as update:
        res = collect(url, keep_last=keep_last, keep_every=keep_every, dry_run=dry_run, grace_seconds=grace_seconds,
                      storage_options=storage_options, progress=update)  # fmt: skip
    doc = {"url": store.url, **_gc_doc(res, grace_seconds)}
    if as_json:
        emit_json(doc)
        return
    verb = "would remove" if dry_run else "removed"
    removed = ", ".join(map(str, res.removed_steps)) or "none"
    click.echo(f"{verb} checkpoints: {removed}; {verb} {res.removed_objects} objects; "
               f"{'would free' if dry_run else 'freed'} {fmt_bytes(res.freed_bytes)}")  # fmt: skip
    click.echo(f"kept checkpoints: {', '.join(map(str, res.kept_steps)) or 'none'}")


def _gc_doc(res: Any, grace_seconds: float | None) -> dict[str, Any]:
    from ckpt import config

    return {
        "grace_seconds": config.gc_grace_seconds() if grace_seconds is None else grace_seconds,
        "dry_run": res.dry_run,
        "kept_steps": list(res.kept_steps),
        "removed_steps": list(res.removed_steps),
        "removed_objects": res.removed_objects,
        "freed_bytes": res.freed_bytes,
    }


def _no_checkpoint(store: Any) -> CheckpointError:
    from ckpt.errors import NoCheckpointError

    return NoCheckpointError(f"no checkpoint in {store.url}")


@contextlib.contextmanager
def _gc_progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """gc's ``progress(phase, done, total)`` as one bar per phase (terminal only)."""
    console = _console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = {"mark": "reading kept manifests", "sweep": "sweeping objects"}.get(phase, phase)
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


@click.command("du")
@click.argument("url")
@click.option("--keep-last", type=click.IntRange(min=1), default=1, show_default=True,
              help="Policy for the 'what gc would free' estimate.")  # fmt: skip
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Policy for the gc estimate.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=None,
              help="Grace period of the gc estimate (default CKPT_GC_GRACE_SECONDS, 900).")  # fmt: skip
@json_option
@storage_option
def du_cmd(url: str, keep_last: int, keep_every: int | None, grace_seconds: float | None, as_json: bool,
           storage_options: dict[str, Any]) -> None:  # fmt: skip
    """Disk usage of the store at URL: stored bytes per checkpoint (objects it references),
    split into unique (only this checkpoint uses them) and shared; the store's totals and
    unreferenced objects; and what `ckpt gc --keep-last N` would free now (a dry run;
    objects younger than the grace period are never swept, so a fresh store frees little).

    \b
    Examples:
      ckpt du file:///runs/exp1
      ckpt du s3://bucket/exp1 --keep-last 3 --json -o anon=false

    \b
    JSON schema:
      {"url": str,
       "checkpoints": [{"step": int, "objects": int, "stored_bytes": int,
                        "unique_bytes": int, "shared_bytes": int, "manifest_bytes": int}],
       "store": {"objects": int, "bytes": int, "manifest_bytes": int,
                 "referenced_objects": int, "referenced_bytes": int,
                 "unreferenced_objects": int, "unreferenced_bytes": int,
                 "missing_objects": int},
       "gc": {"keep_last": int, "keep_every": int|null, "grace_seconds": float, "dry_run": true,
              "kept_steps": [int], "removed_steps": [int], "removed_objects": int,
              "freed_bytes": int},
       "errors": [{"step": int, "error": str}]}

    Exit codes: 0 ok, 1 a manifest is unreadable, 2 bad URL or empty store.
    """
    from ckpt.report import du_report

    store = _store(url, storage_options)
    estimate = None
    if store.steps():
        try:
            from ckpt.gc import collect
        except ImportError:  # pragma: no cover - gc ships with core
            collect = None
        if collect is not None:
            try:
                res = collect(url, keep_last=keep_last, keep_every=keep_every, dry_run=True,
                              grace_seconds=grace_seconds, storage_options=storage_options)  # fmt: skip
                estimate = {"keep_last": keep_last, "keep_every": keep_every, **_gc_doc(res, grace_seconds)}
            except CorruptCheckpointError as exc:
                click.echo(f"ckpt: warning: no gc estimate: {exc}", err=True)
    doc = du_report(store, estimate)
    if as_json:
        emit_json(doc)
    else:
        rows = [[str(c["step"]), str(c["objects"]), fmt_bytes(c["stored_bytes"]), fmt_bytes(c["unique_bytes"]),
                 fmt_bytes(c["shared_bytes"])] for c in doc["checkpoints"]]  # fmt: skip
        emit_table([("step", "right"), ("objects", "right"), ("stored", "right"), ("unique", "right"),
                    ("shared", "right")], rows)  # fmt: skip
        s = doc["store"]
        click.echo(f"store: {s['objects']} objects, {fmt_bytes(s['bytes'])} (+ {fmt_bytes(s['manifest_bytes'])} "
                   f"manifests); referenced {s['referenced_objects']} objects, {fmt_bytes(s['referenced_bytes'])}; "
                   f"unreferenced {s['unreferenced_objects']} objects, {fmt_bytes(s['unreferenced_bytes'])}"
                   + (f"; MISSING {s['missing_objects']} objects" if s["missing_objects"] else ""))  # fmt: skip
        g = doc["gc"]
        if g is not None:
            policy = f"--keep-last {g['keep_last']}" + (f" --keep-every {g['keep_every']}" if g["keep_every"] else "")
            steps = ", ".join(map(str, g["removed_steps"])) or "none"
            click.echo(f"gc {policy} would remove checkpoints: {steps}; {g['removed_objects']} objects; "
                       f"free {fmt_bytes(g['freed_bytes'])} (objects younger than {g['grace_seconds']:g} s are kept)")
    for e in doc["errors"]:
        click.echo(f"ckpt: error: step {e['step']}: {e['error']}", err=True)
    if doc["errors"]:
        raise click.exceptions.Exit(EXIT_CORRUPT)


# -- plugins ------------------------------------------------------------------------------


@click.command("plugins")
@json_option
def plugins_cmd(as_json: bool) -> None:
    """List every loaded plugin: name, version and the hooks it implements.

    Core's built-in adapters and codecs appear as the plugin "ckpt.builtins".
    CKPT_DISABLE_PLUGINS=name1,name2 blocks plugins by name.

    \b
    Examples:
      ckpt plugins
      ckpt plugins --json | jq -r '.plugins[].name'

    \b
    JSON schema:
      {"plugins": [{"name": str, "version": str|null, "hooks": [str]}]}

    Exit codes: 0 ok, 2 a plugin failed to load.
    """
    infos = _plugins().info()
    doc = {"plugins": [{"name": p.name, "version": p.version, "hooks": list(p.hooks)} for p in infos]}
    if as_json:
        emit_json(doc)
        return
    emit_table([("name", "left"), ("version", "left"), ("hooks", "left")],
               [[p["name"], p["version"] or "-", ", ".join(p["hooks"])] for p in doc["plugins"]])  # fmt: skip


COMMANDS = [ls_cmd, show_cmd, diff_cmd, verify_cmd, export_cmd, import_cmd, gc_cmd, plugins_cmd, du_cmd]


if __name__ == "__main__":  # pragma: no cover
    main()
