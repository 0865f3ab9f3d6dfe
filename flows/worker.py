"""The pull step of the work-pool deployment (``prefect.yaml``): a worker runs each flow run in the
checkout named by ``DIFFCL_HOME``, and says what to set when it is missing or wrong, instead of
failing later on a missing ``flows/flow.py``."""

from __future__ import annotations

import os
from pathlib import Path


class WorkerSetupError(RuntimeError):
    pass


def use_diffcl_home() -> dict[str, str]:
    """Change into ``$DIFFCL_HOME`` (a diffcl checkout); returns ``{"directory": ...}`` like
    Prefect's ``set_working_directory`` step."""
    home = os.environ.get("DIFFCL_HOME", "").strip()
    if not home:
        raise WorkerSetupError("DIFFCL_HOME is not set on this worker: export DIFFCL_HOME=/path/to/the/diffcl/checkout "
                               "(the folder with flows/flow.py and configs/) before `prefect worker start`")
    folder = Path(home).expanduser()
    if not (folder / "flows" / "flow.py").is_file():
        raise WorkerSetupError(f"DIFFCL_HOME={home}: no flows/flow.py there; set it to the diffcl checkout")
    os.chdir(folder)
    return {"directory": str(folder.resolve())}
