"""The demo that runs anywhere: the demo config ships inside the package, and its synthetic data is
written under the working directory the first time a run needs it."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports DEMO_CONFIG at start-up: keep this module light
    from diffcl.core.config import PipelineConfig

log = logging.getLogger(__name__)

DEMO_CONFIG = "configs/demo.yaml"  # the default config argument, relative to the working directory
DEMO_SOURCE = Path("workspace/demo-source")  # where the demo config expects its data


def packaged_demo_config() -> Path:
    return Path(str(files("pipeline") / "configs" / "demo.yaml"))


def resolve_config(config: str | Path) -> str:
    """The demo default when the working directory has no configs/demo.yaml: the packaged copy
    (its relative paths still resolve against the working directory)."""
    if str(config) == DEMO_CONFIG and not Path(config).exists():
        return str(packaged_demo_config())
    return str(config)


def ensure_demo_data(cfg: PipelineConfig) -> Path | None:
    """Write the synthetic demo dataset when the config reads it from ./workspace/demo-source and it
    is missing there; the folder when it was written, else None."""
    source = DEMO_SOURCE.resolve()
    wanted = [Path(p) for p in (cfg.dataset.reviews, cfg.dataset.meta) if p]
    if not wanted or any(p.parent != source for p in wanted) or all(p.exists() for p in wanted):
        return None
    from features.synthetic import generate

    paths = generate(source)
    log.info("demo data written to %s (%s, %s)", source, paths["reviews"].name, paths["meta"].name)
    return source
