"""``ckpt cp``: copy checkpoints between two stores (see :mod:`ckpt.storage.copy`)."""

from __future__ import annotations

from typing import Any

import click

from ckpt.cli.common import (
    current_encryption,
    emit_json,
    fmt_bytes,
    json_option,
    key_options,
    parse_storage_options,
    progress_bar,
    storage_option,
)


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("--step", type=int, default=None, help="Copy only this checkpoint (default: every checkpoint).")
@click.option(
    "--dst-storage-option",
    "dst_storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option for DST (repeatable; as -o is for SRC).",
)
@click.option(
    "--verify-dst",
    is_flag=True,
    help="Hash the objects DST holds already and copy again those whose bytes differ from their "
    "record (reads them back: from a cloud store, downloads them).",
)
@json_option
@storage_option
@key_options
def cp_cmd(
    src: str,
    dst: str,
    step: int | None,
    dst_storage_options: tuple[str, ...],
    verify_dst: bool,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
    """Copy checkpoint STEP (every checkpoint when omitted) of the store SRC to the store DST.

    Only the objects DST lacks are moved (a second copy of a run with frozen weights moves
    only what changed); each is read, decoded and verified against its hash before it is
    written; then the manifest, then refs/latest. An object DST holds at its recorded size
    is trusted, unless --verify-dst. Interrupted, it is completed by running
    it again. DST's writer lease is held meanwhile: a live writer there refuses the copy.
    Use it to promote a checkpoint to long-term storage or to move a run between clouds.
    An encrypted SRC needs its key (--key-file, --key-provider or CKPT_KEY_FILE): DST
    becomes the same encrypted store (re-encryption is not supported).

    \b
    Examples:
      ckpt cp /dev/shm/run s3://bucket/run --step 1000
      ckpt cp s3://old/run az://container/run -o anon=false --dst-storage-option account_name=acct

    \b
    JSON schema:
      {"src": str, "dst": str, "step": int, "checkpoints": int, "already": int,
       "objects": int, "bytes": int, "skipped_objects": int, "replaced_objects": int}

    Exit codes: 0 ok, 1 corrupt source (nothing of that checkpoint committed), 2 bad URL,
    unknown step, or DST has a live writer.
    """
    from ckpt.storage.copy import copy_stores
    from ckpt.storage.store import Store

    source = Store(src, storage_options)
    target = Store(dst, parse_storage_options(dst_storage_options))
    with progress_bar(f"copying to {target.url}") as update:
        res = copy_stores(
            source, target, step=step, progress=update, encryption=current_encryption(), verify_existing=verify_dst
        )
    s = res.stats
    if as_json:
        emit_json(
            {
                "src": source.url,
                "dst": target.url,
                "step": res.info.step,
                "checkpoints": s.checkpoints,
                "already": s.already,
                "objects": s.objects,
                "bytes": s.bytes,
                "skipped_objects": s.skipped,
                "replaced_objects": s.replaced,
            }
        )
        return
    click.echo(
        f"copied {s.checkpoints} checkpoint(s) of {source.url} to {target.url} (newest step {res.info.step}; "
        f"{s.already} already there): {s.objects} objects, {fmt_bytes(s.bytes)} ({s.bytes} bytes) copied, "
        f"{s.skipped} objects already there"
        + (f", {s.replaced} replaced (other bytes than recorded)" if s.replaced else "")
    )
