"""The prepared tables as one set: ``prepared/{interactions,items,users}.parquet`` and ``stats.json``.

``stats.json``, written last by the prepare stage, records the sha256 of each table, and every
reader checks the tables it reads against it (:func:`verify_prepared`), so that a prepare stage
killed between two renames never passes for a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcl.core.io import sha256_file

PREPARED_TABLES = ("interactions.parquet", "items.parquet", "users.parquet")


class PreparedDataError(ValueError):
    """Prepared tables that are missing, or not the set that ``stats.json`` describes."""


def table_hashes(prepared: Path, names: tuple[str, ...] = PREPARED_TABLES) -> dict[str, str]:
    """sha256 of each named table: what ``stats.json`` records under ``tables``."""
    return {name: sha256_file(Path(prepared) / name) for name in names}


def verify_prepared(prepared: Path, names: tuple[str, ...] = PREPARED_TABLES) -> dict[str, str]:
    """The hashes of the named tables, checked against ``stats.json``; raises PreparedDataError
    naming the first table that is missing or differs."""
    prepared = Path(prepared)
    rerun = "rerun `diffcl prepare`"
    stats_path = prepared / "stats.json"
    try:
        recorded = json.loads(stats_path.read_text(encoding="utf-8")).get("tables")
    except FileNotFoundError:
        raise PreparedDataError(f"no prepared data in {prepared} ({stats_path.name} is missing); {rerun}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise PreparedDataError(f"{stats_path}: unreadable ({err}); {rerun}") from None
    if not isinstance(recorded, dict):
        raise PreparedDataError(f"{stats_path} records no table hashes (an older data stage wrote it); {rerun}")
    hashes = {}
    for name in names:
        path = prepared / name
        if not path.exists():
            raise PreparedDataError(f"{path} is missing; {rerun}")
        hashes[name] = sha256_file(path)
        if hashes[name] != recorded.get(name):
            raise PreparedDataError(f"{path} is not the table {stats_path.name} describes (an interrupted or "
                                    f"concurrent `diffcl prepare` left a mixed set); {rerun}")
    return hashes
