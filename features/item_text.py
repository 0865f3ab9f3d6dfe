"""Item text: HTML clean-up of raw fields and the assembled text recipe."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")

# MMRec's recipe for the 2014 benchmarks: title, brand, first category path, description.
DEFAULT_RECIPE: tuple[str, ...] = ("title", "brand", "categories", "description")


def clean(value: object) -> str | None:
    """Strip HTML tags and entities and fold white space; None for empty values."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    text = str(value)
    if "<" in text or "&" in text:
        text = html.unescape(_TAG.sub(" ", text))
    text = _SPACE.sub(" ", text).strip()
    return text or None


def clean_list(values: Iterable[object] | None) -> list[str]:
    return [c for c in (clean(v) for v in values or []) if c]


def assemble(fields: dict[str, object], recipe: Sequence[str] = DEFAULT_RECIPE, max_chars: int | None = None) -> str:
    """Join the non-empty fields of the recipe as sentences: "Title. Brand. A B C. Description."."""
    parts: list[str] = []
    for name in recipe:
        value = fields.get(name)
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value if v)
        if value:
            text = str(value).strip()
            parts.append(text if text.endswith((".", "!", "?")) else text + ".")
    out = " ".join(parts)
    return out[:max_chars] if max_chars else out
