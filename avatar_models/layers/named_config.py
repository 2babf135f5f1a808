"""``from_name`` / ``to_dict`` / ``from_dict`` for a system's frozen config dataclass.

A system's config class inherits :class:`NamedConfig` and sets two class attributes after its
table of named shapes is defined: ``SYSTEM`` (the name used in errors) and ``NAMED`` (name ->
field values). Checkpoints store ``to_dict()``; ``from_dict`` ignores keys the class does not know
(checkpoints written by an older version keep loading).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class NamedConfig:
    SYSTEM: ClassVar[str] = ""
    NAMED: ClassVar[dict[str, dict]] = {}

    @classmethod
    def from_name(cls, name: str, **overrides):
        """The named config ``name`` with ``overrides`` (field names checked)."""
        if name not in cls.NAMED:
            raise ValueError(f"unknown {cls.SYSTEM} config {name!r}; expected one of "
                             f"{sorted(cls.NAMED)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown {cls.__name__} field(s) {bad}; expected some of "
                             f"{sorted(fields)}")
        return cls(**{**cls.NAMED[name], "name": name, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        # JSON turns tuple fields (channel lists, rope splits) into lists; a frozen config keeps
        # tuples so that it stays hashable and compares equal to the one that was saved.
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in data.items() if k in fields})
