"""ckpt-peft: a ckpt plugin for peft ``PeftModel`` fine-tunes (LoRA and the other tuners).

Registered through the ``ckpt`` entry-point group under its distribution name
(``ckpt-peft``). Importing this module does not import peft: the adapter recognises a
``PeftModel`` only once the program itself has imported peft.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import ckpt

if TYPE_CHECKING:
    from ckpt_peft.adapter import PeftModelAdapter

try:
    __version__ = version("ckpt-peft")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["PeftModelAdapter", "__version__", "ckpt_register_adapters"]


def __getattr__(name: str) -> Any:
    # every ckpt command loads the plugins: torch is imported only when the adapter is used
    if name == "PeftModelAdapter":
        from ckpt_peft.adapter import PeftModelAdapter

        return PeftModelAdapter
    raise AttributeError(f"module 'ckpt_peft' has no attribute {name!r}")


@ckpt.hookimpl
def ckpt_register_adapters(register) -> None:
    """Register the ``peft.PeftModel`` adapter (asked before core's ``torch.nn.Module`` one)."""
    from ckpt_peft.adapter import PeftModelAdapter

    register(PeftModelAdapter())
