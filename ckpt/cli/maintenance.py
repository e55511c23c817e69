"""Keeping a store in shape: ``ckpt gc``, ``du``, ``unlock`` and ``plugins``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import click

from ckpt.cli.common import (
    console,
    current_encryption,
    emit_json,
    emit_table,
    fmt_bytes,
    json_option,
    key_options,
    open_store,
    plugins,
    report_step_errors,
    storage_option,
)
from ckpt.errors import CheckpointError, CorruptCheckpointError

# -- gc / du ------------------------------------------------------------------------------


@click.command("gc")
@click.argument("url")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Keep the newest N checkpoints.")
@click.option(
    "--keep-every",
    type=click.IntRange(min=1),
    default=None,
    help="Also keep every checkpoint whose step is a multiple of M.",
)
@click.option("--dry-run", is_flag=True, help="Report what would be removed; delete nothing.")
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Never delete objects younger than this (default CKPT_GC_GRACE_SECONDS, 900): "
    "they may belong to a save in flight.",
)
@json_option
@key_options
@storage_option
def gc_cmd(
    url: str,
    keep_last: int,
    keep_every: int | None,
    dry_run: bool,
    grace_seconds: float | None,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
    """Delete the checkpoints a retention policy drops, then sweep unreferenced objects.

    Kept: the newest --keep-last N, every step divisible by --keep-every M, steps held by a
    live lease, always the newest. Mark and sweep from the kept manifests (delta parents
    included); objects younger than the grace period are never swept.

    gc is not a writer: it runs beside a live training run and refuses nothing, but never
    removes what the run's writer lease holds (the checkpoint its next save reuses, the
    objects of its save in flight).

    \b
    Examples:
      ckpt gc file:///runs/exp1 --keep-last 3 --dry-run
      ckpt gc s3://bucket/exp1 --keep-last 2 --keep-every 1000 -o anon=false

    \b
    JSON schema:
      {"url": str, "grace_seconds": float, "dry_run": bool, "kept_steps": [int],
       "removed_steps": [int], "removed_objects": int, "freed_bytes": int,
       "held_steps": [int], "sweep_skipped": str|null}

    Exit codes: 0 ok, 1 a kept manifest or a lease is unreadable (nothing deleted), 2 bad URL or option.
    """
    from ckpt.storage.retention import collect

    store = open_store(url, storage_options)
    if not store.steps():
        raise _no_checkpoint(store)
    with _gc_progress() as update:
        res = collect(
            url,
            keep_last=keep_last,
            keep_every=keep_every,
            dry_run=dry_run,
            grace_seconds=grace_seconds,
            storage_options=storage_options,
            progress=update,
            encryption=current_encryption(),
        )
    doc = {"url": store.url, **_gc_doc(res, grace_seconds)}
    if as_json:
        emit_json(doc)
        return
    verb = "would remove" if dry_run else "removed"
    removed = ", ".join(map(str, res.removed_steps)) or "none"
    click.echo(
        f"{verb} checkpoints: {removed}; {verb} {res.removed_objects} objects; "
        f"{'would free' if dry_run else 'freed'} {fmt_bytes(res.freed_bytes)}"
    )
    click.echo(f"kept checkpoints: {', '.join(map(str, res.kept_steps)) or 'none'}")
    if res.held_steps:
        click.echo(f"held by a live lease (a writer's parent, a reader): {', '.join(map(str, res.held_steps))}")
    if res.sweep_skipped:
        click.echo(f"ckpt: warning: no objects swept: {res.sweep_skipped}; run gc again later", err=True)


def _gc_doc(res: Any, grace_seconds: float | None) -> dict[str, Any]:
    from ckpt import config

    return {
        "grace_seconds": config.gc_grace_seconds() if grace_seconds is None else grace_seconds,
        "dry_run": res.dry_run,
        "kept_steps": list(res.kept_steps),
        "removed_steps": list(res.removed_steps),
        "removed_objects": res.removed_objects,
        "freed_bytes": res.freed_bytes,
        "held_steps": list(res.held_steps),
        "sweep_skipped": res.sweep_skipped,
    }


def _no_checkpoint(store: Any) -> CheckpointError:
    from ckpt.errors import NoCheckpointError

    return NoCheckpointError(f"no checkpoint in {store.url}")


@contextlib.contextmanager
def _gc_progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """gc's ``progress(phase, done, total)`` as one bar per phase (terminal only)."""
    err = console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err, transient=True
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = {"mark": "reading kept manifests", "sweep": "sweeping objects"}.get(phase, phase)
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


@click.command("du")
@click.argument("url")
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Policy for the 'what gc would free' estimate.",
)
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Policy for the gc estimate.")
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Grace period of the gc estimate (default CKPT_GC_GRACE_SECONDS, 900).",
)
@json_option
@key_options
@storage_option
def du_cmd(
    url: str,
    keep_last: int,
    keep_every: int | None,
    grace_seconds: float | None,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
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
    from ckpt.cli.report import du_report

    store = open_store(url, storage_options)
    estimate = None
    if store.steps():
        try:
            from ckpt.storage.retention import collect
        except ImportError:  # pragma: no cover - gc ships with core
            collect = None  # type: ignore[assignment]  # the optional-import pattern; never taken
        if collect is not None:
            try:
                res = collect(
                    url,
                    keep_last=keep_last,
                    keep_every=keep_every,
                    dry_run=True,
                    grace_seconds=grace_seconds,
                    storage_options=storage_options,
                    encryption=current_encryption(),
                )
                estimate = {"keep_last": keep_last, "keep_every": keep_every, **_gc_doc(res, grace_seconds)}
            except CorruptCheckpointError as exc:
                click.echo(f"ckpt: warning: no gc estimate: {exc}", err=True)
    doc = du_report(store, estimate)
    if as_json:
        emit_json(doc)
    else:
        rows = [
            [
                str(c["step"]),
                str(c["objects"]),
                fmt_bytes(c["stored_bytes"]),
                fmt_bytes(c["unique_bytes"]),
                fmt_bytes(c["shared_bytes"]),
            ]
            for c in doc["checkpoints"]
        ]
        emit_table(
            [("step", "right"), ("objects", "right"), ("stored", "right"), ("unique", "right"), ("shared", "right")],
            rows,
        )
        s = doc["store"]
        click.echo(
            f"store: {s['objects']} objects, {fmt_bytes(s['bytes'])} (+ {fmt_bytes(s['manifest_bytes'])} "
            f"manifests); referenced {s['referenced_objects']} objects, {fmt_bytes(s['referenced_bytes'])}; "
            f"unreferenced {s['unreferenced_objects']} objects, {fmt_bytes(s['unreferenced_bytes'])}"
            + (f"; MISSING {s['missing_objects']} objects" if s["missing_objects"] else "")
        )
        g = doc["gc"]
        if g is not None:
            policy = f"--keep-last {g['keep_last']}" + (f" --keep-every {g['keep_every']}" if g["keep_every"] else "")
            steps = ", ".join(map(str, g["removed_steps"])) or "none"
            click.echo(
                f"gc {policy} would remove checkpoints: {steps}; {g['removed_objects']} objects; "
                f"free {fmt_bytes(g['freed_bytes'])} (objects younger than {g['grace_seconds']:g} s are kept)"
            )
    report_step_errors(doc)


# -- unlock -------------------------------------------------------------------------------


@click.command("unlock")
@click.argument("url")
@click.option("--force", is_flag=True, help="Remove the lease even when its holder looks alive.")
@json_option
@storage_option
def unlock_cmd(url: str, force: bool, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Remove the writer lease of the store at URL, so that a new writer starts at once.

    For a holder known to be gone that its successor cannot tell is gone by itself: a
    writer on another host is taken over CKPT_WRITER_LEASE_SECONDS (10) after its
    heartbeat stops, and a dead process on the same host at once. A holder that still
    looks alive (a live process on this host, a heartbeat younger than that bound) is
    only removed with --force; it then fails at its next save and never commits again.

    \b
    Examples:
      ckpt unlock file:///runs/exp1
      ckpt unlock s3://bucket/exp1 --force --json

    \b
    JSON schema:
      {"url": str, "removed": bool,
       "holder": {"host": str, "pid": int, "since": float, "heartbeat": float,
                  "protect": [int], "in_flight": int|null}|null}

    Exit codes: 0 removed (or no lease), 2 the holder looks alive and --force was not given.
    """
    import time

    from ckpt import config
    from ckpt.storage.leases import local_state, read_lease
    from ckpt.storage.writer_lease import writer_lease_path

    store = open_store(url, storage_options)
    path = writer_lease_path(store)
    try:
        record = read_lease(store, path)
    except ValueError as exc:
        record = None
        click.echo(f"ckpt: warning: unreadable writer lease removed ({exc})", err=True)
        store.delete(path)
    holder = None
    if record is not None:
        holder = {
            "host": record.holder.host,
            "pid": record.holder.pid,
            "since": record.since,
            "heartbeat": record.heartbeat,
            "protect": list(record.protect),
            "in_flight": record.in_flight,
        }
        alive = local_state(record.holder)
        if alive is None:
            alive = time.time() - record.heartbeat < config.writer_lease_seconds()
        if alive and not force:
            raise CheckpointError(
                f"the writer of {store.url} looks alive: {record.describe()}; "
                "stop it first, or pass --force to remove its lease anyway"
            )
        store.delete(path)
    if as_json:
        emit_json({"url": store.url, "removed": record is not None, "holder": holder})
    elif record is None:
        click.echo(f"{store.url} has no writer lease")
    else:
        click.echo(f"removed the writer lease of {store.url}: {record.describe()}")


# -- plugins ------------------------------------------------------------------------------


@click.command("plugins")
@json_option
def plugins_cmd(as_json: bool) -> None:
    """List every loaded plugin: name, version and the hooks it implements.

    Core's built-in adapters and codecs appear as the plugin "ckpt.hooks.defaults".
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
    infos = plugins().info()
    doc = {"plugins": [{"name": p.name, "version": p.version, "hooks": list(p.hooks)} for p in infos]}
    if as_json:
        emit_json(doc)
        return
    emit_table(
        [("name", "left"), ("version", "left"), ("hooks", "left")],
        [[p["name"], p["version"] or "-", ", ".join(p["hooks"])] for p in doc["plugins"]],
    )
