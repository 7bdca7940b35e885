"""Gaussian diffusion: noise schedules, the training loss, DDPM/DDIM samplers, classifier-free
guidance and EMA weights. Independent of what is denoised (latent tokens [B, T, D] or gene
vectors [B, G]); the denoiser is any module `net(x_t, t, cond_vector, cond_tokens)`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellfoundry.models.denoiser import ConditionalDenoiser

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddpm", "ddim")


def make_betas(
    kind: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """β_1..β_T (float64 [T]): linear from beta_start to beta_end, or cosine (squaredcos_cap_v2:
    ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2), β clipped at 0.999)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":

        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999) for i in range(timesteps)],
            dtype=torch.float64,
        )
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


class NoiseSchedule:
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I), t in 0..T-1 (index 0 = the least noise)."""

    def __init__(self, kind: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.kind = kind
        self.timesteps = timesteps
        self.betas = make_betas(kind, timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What the network learns: ε, or v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x_0."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            ab = self._ab(t, x0)
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

    def eps_and_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str):
        """Network output at (x_t, t) -> (ε̂, x̂_0)."""
        ab = self._ab(t, x_t)
        if prediction == "eps":
            eps = output
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * output
            eps = (1 - ab).sqrt() * x_t + ab.sqrt() * output
        return eps, x0


def diffusion_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between model_fn(x_t, t) and the ε or v target, t uniform over 0..T-1."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.q_sample(x0, t, noise)
    output = model_fn(x_t, t)
    return F.mse_loss(output.float(), schedule.target(x0, noise, t, prediction).float())


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced time indices from T-1 down to 0."""
    steps = max(1, min(steps, timesteps))
    return sorted({int(round(x)) for x in torch.linspace(0, timesteps - 1, steps).tolist()}, reverse=True)


@torch.no_grad()
def sample(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    method: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    x_T: torch.Tensor | None = None,
    x0_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate x_0 of `shape` from x_T ~ N(0, I).

    The update from t to the previous kept step s (ᾱ_s = 1 after the last step) is
    x_s = sqrt(ᾱ_s) x̂_0 + sqrt(1 − ᾱ_s − σ²) ε̂ + σ z, σ = η · sqrt((1−ᾱ_s)/(1−ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_s).
    DDIM uses the given η (η = 0: deterministic given x_T); DDPM is the ancestral sampler, η = 1
    (with all T steps this is exactly the DDPM posterior).
    x0_range: (low, high) broadcastable to one sample; x̂_0 is clipped to it and ε̂ recomputed
    from the clipped x̂_0 (the usual "clip denoised"). This keeps ε-prediction stable at the
    noisiest steps, where x̂_0 = (x_t − sqrt(1−ᾱ) ε̂) / sqrt(ᾱ) divides by a tiny sqrt(ᾱ).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    if method == "ddpm":
        eta = 1.0
    x = torch.randn(tuple(shape), device=device, generator=generator) if x_T is None else x_T.to(device)
    ab_all = schedule.alphas_cumprod.to(device)
    times = sampling_timesteps(schedule.timesteps, steps)
    for i, t in enumerate(times):
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps, x0 = schedule.eps_and_x0(denoise_fn(x, t_batch).float(), x, t_batch, prediction)
        ab_t = ab_all[t].float()
        if x0_range is not None:
            x0 = x0.clamp(*x0_range)
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        ab_s = ab_all[times[i + 1]].float() if i + 1 < len(times) else torch.tensor(1.0, device=device)
        sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()
        x = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(times):
            x = x + sigma * torch.randn(x.shape, device=device, generator=generator)
    return x


@torch.no_grad()
def invert(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    prediction: str = "eps",
    x0_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM inversion: the x_T from which deterministic DDIM (η = 0, the same `steps`) returns
    approximately x0. It runs the DDIM update upwards through the sampler's time indices, with ε̂
    taken at the previous (less noisy) point, the usual approximation (Song et al. 2021; Mokady
    et al. 2023). Denoising the result under other conditions edits x0 into them."""
    x = x0.float()
    ab_all = schedule.alphas_cumprod.to(x.device)
    times = sampling_timesteps(schedule.timesteps, steps)[::-1]  # 0 .. T-1
    for i, t in enumerate(times):
        s = times[max(i - 1, 0)]  # where ε̂ is taken; at the first step x is x0 itself
        s_batch = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
        ab_s = ab_all[s].float() if i > 0 else torch.tensor(1.0, device=x.device)
        eps, _ = schedule.eps_and_x0(denoise_fn(x, s_batch).float(), x, s_batch, prediction)
        x0_hat = (x - (1 - ab_s).sqrt() * eps) / ab_s.sqrt()
        if x0_range is not None:
            x0_hat = x0_hat.clamp(*x0_range)
            if i > 0:  # ε̂ consistent with the clipped x̂_0, as the sampler does
                eps = (x - ab_s.sqrt() * x0_hat) / (1 - ab_s).sqrt()
        ab_t = ab_all[t].float()
        x = ab_t.sqrt() * x0_hat + (1 - ab_t).sqrt() * eps
    return x


def _repeat_batch(cond_batch: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in cond_batch.items():
        out[key] = value.repeat(times, *([1] * (value.dim() - 1)))
    return out


def guided_denoise_fn(
    model: ConditionalDenoiser,
    cond_batch: Mapping[str, torch.Tensor],
    scales: Sequence[float],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance as a denoise_fn(x_t, t).

    scales: one guidance scale per condition. With one common scale s:
    out = out_uncond + s · (out_cond − out_uncond) (s = 1: conditional only, s = 0: unconditional).
    With different per-attribute scales: out = out_uncond + Σ_k s_k · (out_k − out_uncond), out_k
    conditioned on attribute k alone. The combination is linear in the output, so for
    v-prediction it equals the same combination of ε.
    """
    k = model.conditions.n_conditions
    if k == 0:
        return lambda x, t: model(x, t)
    scales = [float(s) for s in scales]
    if len(scales) != k:
        raise ValueError(f"{len(scales)} guidance scales for {k} conditions")

    def fn(x, t):
        b = x.shape[0]
        device = x.device
        if all(s == scales[0] for s in scales):
            s = scales[0]
            if s == 1.0:
                return model(x, t, cond_batch, torch.ones(b, k, dtype=torch.bool, device=device))
            if s == 0.0:
                return model(x, t, cond_batch, torch.zeros(b, k, dtype=torch.bool, device=device))
            keep = torch.cat([torch.ones(b, k, dtype=torch.bool), torch.zeros(b, k, dtype=torch.bool)]).to(device)
            out = model(torch.cat([x, x]), torch.cat([t, t]), _repeat_batch(cond_batch, 2), keep)
            cond, uncond = out[:b], out[b:]
            return uncond + s * (cond - uncond)
        keeps = [torch.zeros(b, k, dtype=torch.bool)]
        for j in range(k):
            only = torch.zeros(b, k, dtype=torch.bool)
            only[:, j] = True
            keeps.append(only)
        keep = torch.cat(keeps).to(device)
        n = k + 1
        out = model(torch.cat([x] * n), torch.cat([t] * n), _repeat_batch(cond_batch, n), keep)
        uncond = out[:b]
        result = uncond.clone()
        for j in range(k):
            result = result + scales[j] * (out[(j + 1) * b : (j + 2) * b] - uncond)
        return result

    return fn


class EMA(nn.Module):
    """Exponential moving average of a module's parameters (buffers copied).

    decay_t = min(decay, (1 + step) / (10 + step)): a warm-up so short runs (the demo) are not
    dominated by the random initialisation, the usual fix for a 0.9999 decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model)
        self.shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - d)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)
