"""Count likelihoods and sampling of Xpressor's decoded expression: negative binomial (NB) and
zero-inflated NB (ZINB) log-likelihoods, the log1p normalisation of the training targets, the
decoded mean, and seeded count sampling. Shapes: B = cells, G = genes; elementwise unless said.

`out` below is an Xpressor DecoderOutput (scale, theta, pi_logit, log1p; each [B, G]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from cellfoundry.models.xpressor import DecoderOutput

_EPS = 1e-8


def log1p_normalize(counts: Tensor, library_size: Tensor, target_sum: float = 1e4) -> Tensor:
    """log1p(counts / library_size * target_sum); counts [B, G], library_size [B]."""
    return torch.log1p(counts / library_size.clamp(min=1.0)[:, None] * target_sum)


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """Negative-binomial log-likelihood with mean mu and inverse dispersion theta (elementwise)."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, pi_logit: Tensor) -> Tensor:
    """Zero-inflated NB log-likelihood (pi = sigmoid(pi_logit) is the extra-zero probability);
    written with softplus for stability."""
    softplus_pi = F.softplus(-pi_logit)
    log_theta_mu = torch.log(theta + mu + _EPS)
    pi_theta_log = -pi_logit + theta * (torch.log(theta + _EPS) - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_nonzero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < 0.5, case_zero, case_nonzero)


def mean_fraction(scale: Tensor, pi_logit: Tensor, loss: str) -> Tensor:
    """Decoded mean as a fraction of the library [B, G]: scale, times 1 - pi for ZINB."""
    return scale * torch.sigmoid(-pi_logit) if loss == "zinb" else scale


def expected_counts(out: DecoderOutput, library_size: Tensor, loss: str) -> Tensor:
    """Mean counts [B, G] of the decoded distribution for library sizes [B]."""
    return mean_fraction(out.scale, out.pi_logit, loss) * library_size.to(out.scale)[:, None]


def sample_counts(
    out: DecoderOutput, library_size: Tensor, loss: str, generator: torch.Generator | None = None
) -> Tensor:
    """Counts [B, G] drawn from the decoded NB (gamma-Poisson) or ZINB; for loss "mse" a Poisson
    around the mean. Seeded through `generator`."""
    mu = out.scale * library_size.to(out.scale)[:, None]
    if loss == "mse":
        rate = mu
    else:
        # Gamma(theta, mu/theta) then Poisson = NB(mu, theta); torch's Gamma sampler takes no
        # generator, hence the seeded sampler below.
        rate = _standard_gamma(out.theta, generator) * mu / out.theta
    counts = torch.poisson(rate, generator=generator)
    if loss == "zinb":
        dropout = torch.rand(counts.shape, generator=generator, device=counts.device) < torch.sigmoid(out.pi_logit)
        counts = counts.masked_fill(dropout, 0.0)
    return counts


def _standard_gamma(alpha: Tensor, generator: torch.Generator | None) -> Tensor:
    """Seeded Gamma(alpha, 1) draws (Marsaglia-Tsang with boosting for alpha < 1)."""
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        z = torch.randn(a.shape, generator=generator, device=a.device)
        u = torch.rand(a.shape, generator=generator, device=a.device)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp(min=1e-12)) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp(min=1e-12)))
        accept = ok & todo
        out = torch.where(accept, d * v, out)
        todo = todo & ~accept
    u = torch.rand(a.shape, generator=generator, device=a.device)
    return torch.where(boost, out * u.clamp(min=1e-12) ** (1.0 / alpha), out)
