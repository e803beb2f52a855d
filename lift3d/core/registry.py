"""Registries: one per kind of pluggable thing (dataset readers, stage runners).

The core names no reader and no stage. Each registry reads an entry-point group: lift3d's own
entries are declared in ``pyproject.toml`` (``[project.entry-points."lift3d.readers"]`` and
``"lift3d.stages"``), and another installed package can add its own the same way. Code can
also ``register`` an entry at run time. Entries load on first use, so listing the dataset
kinds does not import torch.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from lift3d.core.errors import Lift3dError


class RegistryError(Lift3dError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry:
    """Names -> objects of one kind, from an entry-point group plus run-time registrations."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self._added: dict[str, Any] = {}
        self._loaded: dict[str, Any] = {}
        self._eps: dict | None = None

    def _entry_points(self) -> dict:
        if self._eps is None:  # scanning the installed packages costs tens of ms: once per process
            self._eps = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._eps

    def names(self) -> list[str]:
        return sorted(set(self._entry_points()) | set(self._added))

    def __contains__(self, name: str) -> bool:
        return name in self._added or name in self._entry_points()

    def register(self, name: str, obj: Any = None) -> Any:
        """Add ``obj`` under ``name`` (usable as a decorator when ``obj`` is omitted)."""

        def add(o):
            self._added[name] = o
            self._loaded.pop(name, None)
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        if name in self._added:
            return self._added[name]
        if name not in self._loaded:
            eps = self._entry_points()
            if name not in eps:
                valid = ", ".join(self.names()) or f"none (is lift3d installed? entry points '{self.group}')"
                raise RegistryError(f"unknown {self.kind} {name!r}; valid: {valid}")
            self._loaded[name] = eps[name].load()
        return self._loaded[name]


READERS = Registry("dataset kind", "lift3d.readers")
STAGES = Registry("stage", "lift3d.stages")

__all__ = ["Registry", "RegistryError", "READERS", "STAGES"]
