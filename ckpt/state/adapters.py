"""State adapters: turn a live object into a state tree and load a tree back into it.

An adapter is any object with a ``name`` and three methods (see :class:`Adapter`).
Adapters are registered through the ``ckpt_register_adapters`` hook; the built-in torch
adapters in :mod:`ckpt.state.torch_adapters` use that same hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from ckpt.errors import PluginError


@runtime_checkable
class Adapter(Protocol):
    """Converts one kind of live object to and from a state tree.

    A state tree is a nested mapping whose leaves are tensors or small JSON values
    (lists, tuples, int keys and non-finite floats are kept exactly).
    """

    #: stable name recorded in the manifest, e.g. ``"torch.nn.Module"``
    name: str
    # Optional: a class attribute ``exact_tensors = True`` makes restore refuse, before
    # writing anything, a checkpoint holding tensors the live object lacks.
    # Optional: ``checks_tensor_values = False`` says the adapter's ``check`` looks at the
    # tensors it is given for their shapes, dtypes and structure only: a restore from local
    # disk may then decode them straight into the live tensors after the check. Without it,
    # an adapter with a ``check`` is given the checkpoint's tensors, read into fresh memory.

    def handles(self, obj: Any) -> bool:
        """True when this adapter knows how to capture ``obj``."""

    def state(self, obj: Any) -> Mapping[str, Any]:
        """The object's state tree. Tensors may be the live ones: ckpt copies what it keeps."""

    def load(self, obj: Any, tree: Mapping[str, Any]) -> None:
        """Load ``tree`` (as returned by :meth:`state`, tensors already restored) into ``obj``."""


class AdapterRegistry:
    """Ordered adapters; the first whose ``handles`` is true wins.

    Passed to ``ckpt_register_adapters`` as ``register``.
    """

    def __init__(self) -> None:
        self._adapters: list[Adapter] = []
        self._owner: dict[str, str] = {}
        self.current_plugin = "?"

    def __call__(self, adapter: Adapter) -> None:
        name = getattr(adapter, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"adapter {adapter!r} from plugin {self.current_plugin!r} has no name")
        for method in ("handles", "state", "load"):
            if not callable(getattr(adapter, method, None)):
                raise PluginError(f"adapter {name!r} from plugin {self.current_plugin!r} lacks {method}()")
        if name in self._owner:
            raise PluginError(
                f"adapter name {name!r} registered twice: by {self._owner[name]!r} and by {self.current_plugin!r}"
            )
        self._adapters.append(adapter)
        self._owner[name] = self.current_plugin

    def for_object(self, obj: Any) -> Adapter | None:
        for adapter in self._adapters:
            if adapter.handles(obj):
                return adapter
        return None

    def get(self, name: str) -> Adapter | None:
        for adapter in self._adapters:
            if adapter.name == name:
                return adapter
        return None

    def owner(self, name: str) -> str:
        return self._owner[name]

    def __iter__(self) -> Iterator[Adapter]:
        return iter(self._adapters)
