"""Issue 14, outside containers: the deployment end to end on Prefect's server backed by a real
PostgreSQL (Debian's package), through ``benchmarks/prefect_postgres.py``. Opt in (a couple of
minutes): ``pytest -m postgres tests/test_prefect_postgres.py``; skipped when PostgreSQL is absent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "prefect_postgres.py"

pytestmark = pytest.mark.postgres


def _benchmark():
    spec = importlib.util.spec_from_file_location("prefect_postgres_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up
    spec.loader.exec_module(module)
    return module


def test_deployment_on_postgres_end_to_end():
    bench = _benchmark()
    if bench.find_pg_bin() is None:
        pytest.skip(bench.SKIP_MESSAGE)
    report = bench.main()
    if report.skipped:
        pytest.skip(report.skipped)
    assert report.error is None, report.error
    failed = [name for name, passed in report.checks.items() if not passed]
    assert not failed, failed
    assert {"run 1 Completed", "run 2 Completed", "deployment's schedule registered",
            "run 2: every stage but fetch a cache hit"} <= set(report.checks)
    assert any(bench.EXPECTED_CRON in s for s in report.schedules), report.schedules
    first, second = report.task_states
    assert second.get("Cached", 0) == sum(second.values()) - 1, second  # all but fetch
    assert first.get("Cached", 0) == 0, first  # a cold workspace: nothing to hit
    assert report.ok
