"""Lenient record reading for the raw dumps: JSON lines, Python-literal lines (2014 metadata),
pretty-printed concatenated JSON objects and JSON arrays, plain or gzip.

Malformed records are skipped and counted in a :class:`ParseReport`; the caller decides (by the
configured share) whether the file as a whole is usable, and the error names the first bad line.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line where one is at fault)."""


@dataclass
class ParseReport:
    path: str
    records: int = 0
    bad: int = 0
    first_bad_line: int | None = None
    first_bad_text: str = ""
    first_bad_reason: str = ""

    def add_bad(self, line: int, text: str, reason: str) -> None:
        self.bad += 1
        if self.first_bad_line is None:
            self.first_bad_line, self.first_bad_text, self.first_bad_reason = line, text[:120], reason

    @property
    def bad_share(self) -> float:
        return self.bad / self.records if self.records else 0.0

    def check(self, max_share: float) -> None:
        if self.records and self.bad == self.records:
            raise DataError(f"{self.path}: no record could be parsed (line {self.first_bad_line}: {self.first_bad_reason})")
        if self.bad_share > max_share:
            share, limit = distinct_percentages(self.bad_share, max_share)
            raise DataError(
                f"{self.path}: {self.bad} of {self.records} records are malformed "
                f"({share} > prepare.max_bad_share {limit}); "
                f"first at line {self.first_bad_line} ({self.first_bad_reason}): {self.first_bad_text!r}"
            )


def distinct_percentages(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` as percentages with the fewest decimals (one at least) that tell them apart,
    so that a message comparing them never reads ``1.0% > 1.0%``."""
    for digits in range(1, 10):
        pa, pb = f"{a:.{digits}%}", f"{b:.{digits}%}"
        if pa != pb:
            return pa, pb
    return f"{a:%}", f"{b:%}"


GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def gzip_error(path: str | Path, err: Exception) -> DataError:
    """The one-line error of a gzip file that cannot be decompressed to its end."""
    if isinstance(err, EOFError):
        return DataError(f"{path}: the gzip file is truncated (it ends before its end-of-stream marker), "
                         "as after an interrupted download or copy; fetch it again")
    return DataError(f"{path}: corrupt gzip data ({err}); fetch the file again")


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Plain or gzip bytes, told by the magic bytes, not the name."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def first_non_utf8_line(path: str | Path) -> tuple[int, int] | None:
    """(line number, first offending byte) of the first line that is not UTF-8, or None."""
    with _open_binary(Path(path)) as handle:
        for lineno, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return lineno, line[err.start]
    return None


def describe_read_error(path: str | Path, err: Exception) -> str:
    """A table reader's error, with the line where it is a text-encoding one (polars names none)."""
    message = str(err).lower()
    if "utf-8" not in message and "utf8" not in message:
        return str(err)
    try:
        found = first_non_utf8_line(path)
    except (OSError, *GZIP_ERRORS):
        found = None
    return str(err) if found is None else f"line {found[0]} is not UTF-8 text (byte {found[1]:#04x})"


def open_text(path: str | Path) -> io.TextIOBase:
    """Open plain or gzip text by its magic bytes, not its name."""
    return io.TextIOWrapper(_open_binary(Path(path)), encoding="utf-8", errors="replace")


def _parse_line(line: str, allow_literal: bool) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        if not allow_literal:
            raise
    # 2014 metadata: Python dict literals with single quotes. literal_eval never executes code.
    return ast.literal_eval(line)


def iter_records(
    path: str | Path,
    report: ParseReport,
    *,
    allow_literal: bool = False,
    keep_line: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the object records of a file, counting malformed ones in ``report``.

    ``keep_line`` is a cheap pre-filter on the raw line (e.g. "is this asin wanted?") so that
    expensive parsing is spent only on records that will be used; it applies to line-per-record
    files. A gzip file that cannot be decompressed to its end is a :class:`DataError` naming it.
    """
    try:
        yield from _records(path, report, allow_literal, keep_line)
    except GZIP_ERRORS as err:
        raise gzip_error(path, err) from None


def _records(path: str | Path, report: ParseReport, allow_literal: bool,
             keep_line: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    with open_text(path) as handle:
        first = ""
        for first in handle:
            if first.strip():
                break
        head = first.strip()
        if head.startswith("[") or head == "{" or (head.startswith("{") and not head.endswith("}")):
            rest = handle.read()
            yield from _iter_document(first + rest, report)
            return
        lines = _chain_first(first, handle)
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if keep_line is not None and not keep_line(line):
                continue
            report.records += 1
            try:
                record = _parse_line(line, allow_literal)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                report.add_bad(lineno, line, type(err).__name__)
                continue
            if not isinstance(record, dict):
                report.add_bad(lineno, line, "not an object")
                continue
            yield record


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    # Line numbers stay right: blank leading lines are rare and skipped before ``first``.
    yield first
    yield from rest


def _iter_document(text: str, report: ParseReport) -> Iterator[dict[str, Any]]:
    """A JSON array, or objects pretty-printed one after another (as some published copies are)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        report.records += 1
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            report.add_bad(err.lineno, "", f"invalid JSON array: {err.msg}")
            return
        report.records += len(data) - 1
        for i, record in enumerate(data):
            if isinstance(record, dict):
                yield record
            else:
                report.add_bad(i + 1, str(record), "array element is not an object")
        return
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return
        report.records += 1
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            report.add_bad(err.lineno, text[pos : pos + 120], f"invalid JSON: {err.msg}")
            # Resynchronise at the next line that opens an object.
            nxt = text.find("\n{", pos + 1)
            if nxt < 0:
                return
            pos = nxt + 1
            continue
        pos = end
        if isinstance(record, dict):
            yield record
        else:
            report.add_bad(text.count("\n", 0, pos) + 1, str(record)[:120], "not an object")
