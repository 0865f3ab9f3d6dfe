"""Offline-friendly Prefect defaults, applied before Prefect is imported (a user's own settings win)."""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls from an offline machine
    "DO_NOT_TRACK": "1",
    # The temporary server can take 10-15 s to start on a small machine; Prefect's default is shorter.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "INFO",
    # The library's own loggers (epochs, downloads, skipped modalities) show in the Prefect UI too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "diffcl,features,pipeline,flows",
    # ... and the same loggers run outside any flow (diffcl train, prepare, ...): no API, no warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_offline_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
