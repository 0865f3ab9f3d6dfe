"""The layering the folder tree promises, checked on every import statement (function-level ones
too): the ground floor imports nothing above it, the data layer (``features``) and the model
library never import each other, the stage layer never imports Prefect, and only ``flows`` does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffcl", "features", "pipeline", "flows")


def layer(module: str) -> str | None:
    """``core``, ``features``, ``models`` (the model library), ``pipeline``, ``flows``, ``prefect``;
    None for anything else (the standard library, numpy, torch, ...)."""
    top = module.split(".")[0]
    if top in ("prefect", "prefect_dask"):
        return "prefect"
    if module == "diffcl" or module.startswith("diffcl.core"):
        return "core"
    if top == "diffcl":
        return "models"
    return top if top in PACKAGES else None


ALLOWED = {
    "core": {"core"},
    "features": {"core", "features"},
    "models": {"core", "models"},
    "pipeline": {"core", "features", "models", "pipeline"},
    "flows": {"core", "features", "models", "pipeline", "flows", "prefect"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out.append((dotted.removesuffix(".__init__"), path))
    return out


MODULES = modules()


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_module_imports_only_its_own_layer_and_those_below(name: str, path: Path):
    own = layer(name)
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target} ({layer(target)})"
           for line, target in imports(path) if layer(target) not in (None, *ALLOWED[own])]
    assert not bad, f"{own} layer may import only {sorted(ALLOWED[own])}:\n" + "\n".join(bad)


def test_every_registered_model_has_a_config_section():
    from diffcl.core.config import model_names
    from diffcl.models import REGISTRY

    assert sorted(REGISTRY) == model_names()
