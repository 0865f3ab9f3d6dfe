"""Model registry: ``model.name`` in the config picks a class registered here."""

from __future__ import annotations

from diffcl.models.base import Batch, ModelContext, Recommender

REGISTRY: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    REGISTRY[cls.name] = cls
    return cls


def build_model(name: str, ctx: ModelContext, config) -> Recommender:
    if name not in REGISTRY:
        raise KeyError(f"model.name: unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, config).to(ctx.device)


# Importing the model modules registers them.
from diffcl.models import diffcl, freedom, lightgcn, mf  # noqa: E402,F401

__all__ = ["REGISTRY", "Batch", "ModelContext", "Recommender", "build_model", "register"]
