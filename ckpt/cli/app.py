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

import os
import sys
import traceback
from typing import Any

import click

from ckpt.cli.common import EXIT_CORRUPT, EXIT_HELP, EXIT_OK, EXIT_USAGE
from ckpt.cli.cp import cp_cmd
from ckpt.cli.inspect import diff_cmd, ls_cmd, show_cmd, verify_cmd
from ckpt.cli.maintenance import du_cmd, gc_cmd, plugins_cmd, unlock_cmd
from ckpt.cli.rekey import rekey_cmd
from ckpt.cli.transfer import export_cmd, import_cmd
from ckpt.errors import CheckpointError, CorruptCheckpointError, PluginError

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
        except BrokenPipeError:  # `ckpt show URL | head -1`: the reader has what it wanted
            _quiet_stdout()
            ctx.exit(EXIT_OK)
        except CheckpointError as exc:
            code = EXIT_CORRUPT if isinstance(exc, CorruptCheckpointError) else EXIT_USAGE
            _fail(ctx, str(exc), code)
        except OSError as exc:
            _fail(ctx, f"{type(exc).__name__}: {exc}", EXIT_USAGE)
        except Exception as exc:  # noqa: BLE001 - a bug: still one line unless --debug
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_USAGE)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if ctx.params.get("debug"):
        traceback.print_exc()
    click.echo("ckpt: error: " + " ".join(message.split()), err=True)
    ctx.exit(code)


ROOT_HELP = f"""Inspect, verify, diff, export, import and garbage-collect ckpt checkpoint stores.

A store is any fsspec URL or local path (file:///runs/a, s3://bucket/run, memory://x);
pass backend options with --storage-option KEY=VALUE. An encrypted store needs its key:
--key-file FILE (or CKPT_KEY_FILE) or --key-provider kms:KEY_ID, after the command name.

\b
Examples:
  ckpt ls file:///runs/exp1
  ckpt show /runs/exp1 --step 200
  ckpt verify s3://bucket/exp1 -o anon=false
  ckpt export /runs/exp1 model.safetensors --key model

{EXIT_HELP}

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
    root.sealed = True
    return root


def build_cli() -> CkptGroup:
    """A fresh root group with the built-in commands and every plugin's subcommands."""
    from ckpt.hooks.manager import get_plugins

    root = _make_root()
    get_plugins(adapters=False).register_commands(cli=root)
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
    except BrokenPipeError:  # `ckpt ls ... | head`, outside a command
        _quiet_stdout()
        sys.exit(EXIT_OK)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it again at exit and would report the
    closed pipe on stderr."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


COMMANDS = [
    ls_cmd,
    show_cmd,
    diff_cmd,
    verify_cmd,
    export_cmd,
    import_cmd,
    gc_cmd,
    unlock_cmd,
    plugins_cmd,
    du_cmd,
    rekey_cmd,
    cp_cmd,
]


if __name__ == "__main__":  # pragma: no cover
    main()
