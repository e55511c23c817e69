"""Moving checkpoints in and out: ``ckpt export`` and ``ckpt import``."""

from __future__ import annotations

from typing import Any

import click

from ckpt.cli.common import (
    current_encryption,
    emit_json,
    fmt_bytes,
    json_option,
    key_options,
    progress_bar,
    storage_option,
)

# -- export / import ----------------------------------------------------------------------


@click.command("export")
@click.argument("url")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the newest).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch"]),
    default=None,
    help="Output format (default: from OUT's suffix: .safetensors; .pt .pth .bin .ckpt = torch).",
)
@click.option("--key", default=None, help="Export only this top-level key (e.g. model), without its prefix.")
@json_option
@key_options
@storage_option
def export_cmd(
    url: str,
    out: str,
    step: int | None,
    fmt: str | None,
    key: str | None,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
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

    from ckpt.interop.export import export_checkpoint

    with progress_bar("exporting") as update:
        res = export_checkpoint(
            url,
            out,
            step=step,
            fmt=fmt,
            key=key,
            storage_options=storage_options,
            progress=update,
            encryption=current_encryption(),
        )
    if as_json:
        emit_json(dataclasses.asdict(res))
    else:
        click.echo(
            f"exported step {res.step} of {res.url} to {res.out} ({res.format}, {res.tensors} tensors, "
            f"{fmt_bytes(res.raw_bytes)} of tensor data, file {fmt_bytes(res.file_bytes)})"
        )


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
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="KEY=ADAPTER",
    callback=_adapter_pairs,
    help="Record top-level KEY as saved by ADAPTER (e.g. model=torch.nn.Module, "
    "optim=torch.optim.Optimizer) so ckpt.restore loads it into live objects.",
)
@json_option
@key_options
@storage_option
def import_cmd(
    src: str, url: str, step: int, adapters: dict[str, str], as_json: bool, storage_options: dict[str, Any]
) -> None:
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

    from ckpt.interop.export import import_checkpoint

    with progress_bar("importing") as update:
        res = import_checkpoint(
            src,
            url,
            step=step,
            adapters=adapters,
            storage_options=storage_options,
            progress=update,
            encryption=current_encryption(),
        )
    if as_json:
        emit_json(dataclasses.asdict(res))
    else:
        click.echo(
            f"imported {res.src} ({res.kind}) as step {res.step} of {res.url}: {res.tensors} tensors, "
            f"{fmt_bytes(res.raw_bytes)} raw, {fmt_bytes(res.stored_bytes)} written"
        )
