"""Name -> factory registries for models, methods, datasets and SSL transforms.

Registries let configs refer to components by name and let users plug their
own in (``@MODELS.register("my_net")``) without touching the library.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str | None = None, *aliases: str):
        def deco(obj):
            key = (name or obj.__name__).lower()
            for k in (key, *aliases):
                if k in self._items and self._items[k] is not obj:
                    raise KeyError(f"{self.kind} '{k}' is already registered")
                self._items[k] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        key = str(name).lower()
        if key not in self._items:
            raise KeyError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def build(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)

    def names(self) -> Iterable[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._items


MODELS = Registry("model")
METHODS = Registry("method")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("ssl transform")
