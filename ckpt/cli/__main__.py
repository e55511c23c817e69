"""``python -m ckpt.cli``: the same as the ``ckpt`` command."""

from ckpt.cli.app import main

main()
