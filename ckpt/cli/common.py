"""What every ``ckpt`` command shares: options, exit codes, output (tables, JSON, progress)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2

EXIT_HELP = """\b
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
                raise click.BadParameter(
                    f"{key!r} nests under {part!r}, which already has a value", param_hint="'--storage-option'"
                )
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

ENCRYPTION_META = "ckpt.encryption"


def _key_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Both options resolve together, once the second of them has been seen; the Encryption
    # lands in ctx.meta, where open_store() and current_encryption() find it.
    seen = ctx.meta.setdefault("ckpt.key_options", {})
    seen[param.name] = value
    if len(seen) == 2:
        ctx.meta[ENCRYPTION_META] = encryption_for(seen["key_file"], seen["key_provider"])
    return value


def encryption_for(key_file: str | None, key_provider: str | None) -> Any:
    """An ``Encryption`` for ``--key-file`` or ``--key-provider``, else for ``CKPT_KEY_FILE``,
    else None."""
    from ckpt import config
    from ckpt.errors import EncryptionError

    if key_file and key_provider:
        raise EncryptionError("give --key-file or --key-provider, not both")
    if key_provider:
        provider = plugins().key_provider(key_provider)
    elif key_file or config.key_file():
        from ckpt.security.providers import KeyFileProvider

        provider = KeyFileProvider(key_file or str(config.key_file()))
    else:
        return None
    from ckpt.security.keys import Encryption

    return Encryption(provider)


def key_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--key-file FILE`` and ``--key-provider SPEC`` for a command that reads or writes a store.

    Without either, ``CKPT_KEY_FILE`` names the key file; with none of the three the store
    is opened without a key (a plain store, or an encrypted one for what needs no key).
    """
    fn = click.option(
        "--key-provider",
        "key_provider",
        metavar="SPEC",
        default=None,
        expose_value=False,
        callback=_key_callback,
        help="Key provider of an encrypted store, SCHEME:VALUE: file:PATH, "
        "kms:KEY_ID[?region=R&endpoint_url=U&profile=P&context.K=V], or a plugin's scheme.",
    )(fn)
    return click.option(
        "--key-file",
        "key_file",
        metavar="FILE",
        default=None,
        expose_value=False,
        callback=_key_callback,
        help="Key of an encrypted store: a file holding 64 hex digits, base64 or 32 raw bytes "
        "(default: $CKPT_KEY_FILE).",
    )(fn)


def current_encryption() -> Any:
    """The ``Encryption`` that the running command's key options gave (None: no key)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(ENCRYPTION_META) if ctx is not None else None


# -- output helpers -----------------------------------------------------------------------


def console(stderr: bool = False) -> Any:
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


def created(s: str) -> str:
    return s.replace("T", " ")[:19] if s else "-"


def short(value: Any, width: int = 60) -> str:
    """An encoded tree value as Python prints it (``inf``, ``(1, 2)``), cut to ``width``,
    :func:`printable`."""
    from ckpt.cli.values import python_text

    text = printable(python_text(value))
    return text if len(text) <= width else text[: width - 3] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` from a store (a tree key, a file name) with its control characters escaped
    (``\\x1b``): a hostile store must not drive the terminal or forge a line of output."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def emit_table(columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; aligned plain text (header line, two-space gaps) otherwise."""
    out = console()
    if out.is_terminal:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for name, justify in columns:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*row)
        out.print(table)
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
    err = console(stderr=True)
    if not err.is_terminal:
        yield lambda _advance, _total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    extra = [DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), *extra, TimeRemainingColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda advance, total: bar.update(task, advance=advance, total=total)


def open_store(url: str, storage_options: dict[str, Any]) -> Any:
    """The store at ``url``, opened with the command's key options (an encrypted store
    without its key, or with a wrong one, is an EncryptionError before any data is read)."""
    from ckpt.security.envelope import open_store as open_envelope
    from ckpt.storage.store import Store

    store = Store(url, storage_options)
    open_envelope(store, current_encryption())
    return store


def plugins() -> Any:
    from ckpt.hooks.manager import get_plugins

    return get_plugins(adapters=False)  # the adapters import torch; read-only commands never use them


def report_step_errors(doc: dict[str, Any]) -> None:
    """Print a report's unreadable checkpoints on stderr; exit 1 when there are any."""
    for e in doc["errors"]:
        click.echo(f"ckpt: error: step {e['step']}: {e['error']}", err=True)
    if doc["errors"]:
        raise click.exceptions.Exit(EXIT_CORRUPT)
