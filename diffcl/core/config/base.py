"""What every config section shares: strict models, modality names, search-space ranges."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

# A modality is a name plus an items x d matrix (features/<name>.parquet); the name becomes a file
# name, a module key and a config key, hence a plain identifier. "id" is DiffCL's ID branch.
MODALITY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_MODALITIES = ("id",)


def check_modality_name(name: str) -> str:
    if not MODALITY_NAME.fullmatch(name) or name in RESERVED_MODALITIES:
        raise ValueError(f"modality name {name!r} must be an identifier (letters, digits, _; not a digit first) "
                         f"other than {', '.join(RESERVED_MODALITIES)}")
    return name


Modality = Annotated[str, AfterValidator(check_modality_name)]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Search spaces of `diffcl tune`: dotted config key -> range. Each model config declares its own
# keys in ``search_space``; SHARED_SEARCH_SPACE applies to every model. Modest on purpose: a
# comparison gives every model the same trial budget, and a small space is covered by it.


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from [low, high]."""

    low: float
    high: float


@dataclass(frozen=True)
class IntRange:
    """An integer in [low, high]."""

    low: int
    high: int


@dataclass(frozen=True)
class Choice:
    """One of a few values."""

    options: tuple[Any, ...]


SearchParam = LogUniform | IntRange | Choice
SearchSpace = dict[str, SearchParam]
