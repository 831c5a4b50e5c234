"""Reading JSON objects the way Go's encoding/json does, which flannel relies on.

Go matches object keys to struct fields case-insensitively (an exact match is not needed), and
when the same field appears twice the last one wins. flannel's users write ``"vni"``, ``"VNI"``
and ``"Vni"`` interchangeably, so every JSON we share with flannel is read through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FoldedObject(Mapping[str, Any]):
    """A read-only view of a JSON object whose keys match case-insensitively."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)
        self._folded: dict[str, str] = {}
        for key in data:
            self._folded[key.casefold()] = key

    def __getitem__(self, key: str) -> Any:
        return self._data[self._folded[key.casefold()]]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.casefold() in self._folded

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._folded[k] for k in self._folded)

    def __len__(self) -> int:
        return len(self._folded)

    def raw(self) -> dict[str, Any]:
        """The object as it was given, unknown keys included, for passing on unchanged."""
        return dict(self._data)
