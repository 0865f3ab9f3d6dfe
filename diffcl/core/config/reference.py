"""Every key of a config with its value, its default and what it means (`diffcl config`), read off
the pydantic models themselves, so the reference cannot drift from the code that defines the keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from diffcl.core.config.base import ConfigError


class _Required:
    """The default of a key that has none: the config must give it."""

    def __str__(self) -> str:
        return "(required)"

    __repr__ = __str__


REQUIRED = _Required()


@dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, as --set takes it: model.diffcl.item_graph_weighting
    value: Any
    default: Any  # REQUIRED where the key has no default
    description: str

    @property
    def changed(self) -> bool:
        if isinstance(self.default, Path) and isinstance(self.value, Path):  # loading resolves paths
            return self.value != self.default.expanduser().resolve()
        return self.default is REQUIRED or self.value != self.default


def config_keys(section: BaseModel, prefix: str = "") -> list[ConfigKey]:
    """The leaf keys of ``section`` in definition order; nested sections are walked, not listed."""
    keys = []
    for name, field in type(section).model_fields.items():
        key, value = f"{prefix}{name}", getattr(section, name)
        if isinstance(value, BaseModel):
            keys += config_keys(value, f"{key}.")
            continue
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        keys.append(ConfigKey(key, value, default, field.description or ""))
    return keys


def keys_under(section: BaseModel, prefix: str | None) -> list[ConfigKey]:
    """The keys equal to ``prefix`` or below it (all with None); a prefix that names no key is an error."""
    keys = config_keys(section)
    if not prefix:
        return keys
    chosen = [k for k in keys if k.key == prefix or k.key.startswith(f"{prefix}.")]
    if not chosen:
        # Name what the deepest existing part of the prefix holds, so a typo is one look away.
        parent = prefix.rpartition(".")[0]
        while parent and not any(k.key.startswith(f"{parent}.") for k in keys):
            parent = parent.rpartition(".")[0]
        below = sorted({k.key[len(parent) + 1 if parent else 0:].split(".")[0] for k in keys
                        if not parent or k.key.startswith(f"{parent}.")})
        raise ConfigError(f"{prefix}: no such config key or section; {parent or 'the config'} holds: {', '.join(below)}")
    return chosen
