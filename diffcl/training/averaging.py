"""An exponential moving average of a model's weights (Polyak averaging), for evaluation.

Validation, test and the saved best weights read the average instead of the weights the last step
left: on a noisy validation curve the best epoch then says less about where the last few steps
happened to land, and more about the setting. Training itself follows the raw weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """Per optimizer step, ``average += (1 - d_t) * (weights - average)`` over the floating-point
    parameters, with ``d_t = min(decay, (1 + t) / (10 + t))``: the warm-up keeps the first steps
    from being dominated by the initial weights (TensorFlow's ``num_updates`` form). Buffers (e.g.
    DiffCL's generated graphs) are not averaged: the average is evaluated with the live ones."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.dtype.is_floating_point]
        params = dict(model.named_parameters())
        self.live = [params[name] for name in self.names]
        self.average = [p.detach().clone() for p in self.live]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, live in zip(self.average, self.live, strict=True):
            average.lerp_(live.detach(), 1.0 - decay)
        self.steps += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.live]
            for live, average in zip(self.live, self.average, strict=True):
                live.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, saved in zip(self.live, own, strict=True):
                    live.copy_(saved)

    def state_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "average": dict(zip(self.names, self.average, strict=True))}

    def load_state_dict(self, state: dict[str, object]) -> None:
        average = state["average"]
        missing = set(self.names) - set(average)
        if missing:
            raise KeyError(f"weight average lacks {sorted(missing)}")
        self.average = [average[name].to(p.device).clone() for name, p in zip(self.names, self.live, strict=True)]
        self.steps = int(state["steps"])
