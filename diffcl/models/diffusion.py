"""Gaussian diffusion over representation rows (the DiffMM / DiffRec machinery): the forward
schedule, an x0-predicting denoiser with a sinusoidal time embedding, the DDPM posterior mean for
the reverse steps, and the SNR-weighted denoising loss.

Schedule (DiffMM): the noise levels 1 - ᾱ_t rise linearly from s·β_min to s·β_max over T steps, so
the final noise level is set by the noise scale s, not by T.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffcl.core.device import dense_autocast


class GaussianSchedule(nn.Module):
    def __init__(self, steps: int = 5, noise_scale: float = 0.1, noise_min: float = 1e-4, noise_max: float = 0.02):
        super().__init__()
        if steps < 1:
            raise ValueError("diffusion needs at least one step")
        one_minus = torch.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=torch.float64)
        alpha_bar = 1.0 - one_minus
        betas = torch.empty(steps, dtype=torch.float64)
        betas[0] = 1.0 - alpha_bar[0]
        betas[1:] = torch.clamp(1.0 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        snr = alpha_bar / (1.0 - alpha_bar)
        # DiffMM's weight SNR(t-1) - SNR(t) (1 at t = 0); divided by its mean over t so that
        # λ_diff keeps its meaning whatever the schedule (the raw weights span five orders of magnitude).
        weight = torch.cat([torch.ones(1, dtype=torch.float64), snr[:-1] - snr[1:]])
        buffers = {
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "posterior_coef_x0": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_coef_xt": (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar),
            "loss_weight": weight / weight.mean(),
            "betas": betas,
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.steps = steps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, with t per row."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self.sqrt_alpha_bar[t].unsqueeze(1) * x0 + self.sqrt_one_minus_alpha_bar[t].unsqueeze(1) * noise

    def posterior_mean(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0) with the predicted x0 (the DDPM reverse step, no sampling noise)."""
        return self.posterior_coef_x0[t].unsqueeze(1) * x0_pred + self.posterior_coef_xt[t].unsqueeze(1) * x_t

    def noise_std(self, t: int) -> float:
        return float(self.sqrt_one_minus_alpha_bar[t])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class Denoiser(nn.Module):
    """f_θ(x_t, t[, c]) -> x0: [x_t ; Linear(time embedding) ; c] -> Linear -> tanh -> Linear.

    ``cond_dim`` > 0: every row comes with a condition row c (e.g. the same node's ID-branch row).
    """

    def __init__(self, dim: int, hidden: int = 256, time_dim: int = 10, cond_dim: int = 0):
        super().__init__()
        self.time_dim, self.cond_dim = time_dim, cond_dim
        self.time = nn.Linear(time_dim, time_dim)
        self.net = nn.Sequential(nn.Linear(dim + time_dim + cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(f"this denoiser takes a condition of width {self.cond_dim} (got {'none' if cond is None else 'one'})")
        emb = self.time(timestep_embedding(t, self.time_dim))
        return self.net(torch.cat([x_t, emb] if cond is None else [x_t, emb, cond], dim=1))


class Diffusion(nn.Module):
    """A schedule and its denoiser, with the three things the model asks of them.

    ``dtype``: autocast dtype of the denoiser's products (None: float32); its outputs are float32.
    """

    def __init__(self, dim: int, steps: int, noise_scale: float, noise_min: float, noise_max: float,
                 hidden: int, time_dim: int, dtype: torch.dtype | None = None, cond_dim: int = 0):
        super().__init__()
        self.schedule = GaussianSchedule(steps, noise_scale, noise_min, noise_max)
        self.denoiser = Denoiser(dim, hidden, time_dim, cond_dim)
        self.dtype = dtype

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with dense_autocast(self.dtype, x_t.device):
            if params is None:
                out = self.denoiser(x_t, t, cond)
            else:
                out = torch.func.functional_call(self.denoiser, params, (x_t, t, cond))
        return out.float()

    def row_losses(self, x0: torch.Tensor, cond: torch.Tensor | None = None,
                   embed: tuple[torch.Tensor, torch.Tensor] | None = None, embed_weight: float = 0.0) -> torch.Tensor:
        """Per row: the SNR-weighted MSE of the x0 prediction at a uniform random step. x0 and the
        condition are detached: this loss trains the denoiser, not the encoder.

        ``embed`` = (E_pred, E_true), for rows that are interaction vectors over items (DiffMM's
        modality-aware signal): ``embed_weight`` times the MSE between pred·E_pred and x0·E_true is
        added to each row's loss (both tables detached).
        """
        x0 = x0.detach()
        cond = None if cond is None else cond.detach()
        t = torch.randint(0, self.schedule.steps, (x0.shape[0],), device=x0.device)
        pred = self._denoise(self.schedule.q_sample(x0, t), t, cond)
        loss = (x0 - pred).pow(2).mean(dim=1)
        if embed is not None and embed_weight > 0:
            e_pred, e_true = (e.detach() for e in embed)
            loss = loss + embed_weight * (pred @ e_pred - x0 @ e_true).pow(2).mean(dim=1)
        return self.schedule.loss_weight[t] * loss

    def generate(self, x0: torch.Tensor, start: int, cond: torch.Tensor | None = None, add_noise: bool = True) -> torch.Tensor:
        """A view: noise x0 forward to step ``start`` (1..T), then reverse with posterior means to 0.
        ``add_noise`` false: the reverse chain starts from x0 itself (DiffMM's graph sampling).

        Differentiable in x0, so a loss on the view reaches the encoder. The denoiser acts here as
        a fixed map (its weights detached): it is trained by its own loss, as in DiffMM, and the
        backward pass skips the weight gradients of T chained calls. The condition is detached.
        """
        if start <= 0:
            return x0
        params = {name: p.detach() for name, p in self.denoiser.named_parameters()}
        cond = None if cond is None else cond.detach()
        t = torch.full((x0.shape[0],), start - 1, dtype=torch.long, device=x0.device)
        x = self.schedule.q_sample(x0, t) if add_noise else x0
        for step in range(start - 1, -1, -1):
            t = torch.full_like(t, step)
            x = self.schedule.posterior_mean(self._denoise(x, t, cond, params), x, t)
        return x

    def perturb(self, x0: torch.Tensor, start: int) -> torch.Tensor:
        """The ablation without diffusion: Gaussian noise of the same level as step ``start``."""
        if start <= 0:
            return x0
        return x0 + self.schedule.noise_std(start - 1) * torch.randn_like(x0)
