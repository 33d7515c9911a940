"""Name <-> index vocabularies for units and sessions, stored in every checkpoint.

Unit keys are ``"{session_id}/{unit_id}"``: unit names mean nothing across sessions.
Index 0 of the unit vocabulary is reserved for ``<null>``, the always-present token that
lets a latent attend to "no spike" when its group is empty.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NULL_UNIT = "<null>"


def unit_key(session_id: str, unit_id: str) -> str:
    return f"{session_id}/{unit_id}"


class Vocab:
    """An ordered, append-only list of names."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.extend(names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the vocabulary ({len(self)} entries)") from None

    def extend(self, names: Iterable[str]) -> list[str]:
        """Append the names not yet present; returns the ones added, in order."""
        added = []
        for n in names:
            if n not in self._index:
                self._index[n] = len(self.names)
                self.names.append(n)
                added.append(n)
        return added

    def lookup(self, names: Iterable[str]) -> np.ndarray:
        return np.array([self[n] for n in names], dtype=np.int64)

    def to_list(self) -> list[str]:
        return list(self.names)


class UnitVocab(Vocab):
    """Unit vocabulary with ``<null>`` at index 0."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        super().__init__([NULL_UNIT])
        self.extend(n for n in names if n != NULL_UNIT)

    def session_units(self, session_id: str, unit_ids: list[str]) -> np.ndarray:
        """Vocabulary index of each of a session's units (U,)."""
        return self.lookup(unit_key(session_id, u) for u in unit_ids)

    def unit_names(self, session_id: str) -> list[str]:
        """A session's unit ids, in vocabulary order (the order packages list them)."""
        prefix = unit_key(session_id, "")
        return [n[len(prefix) :] for n in self.names if n.startswith(prefix)]
