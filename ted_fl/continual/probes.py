"""SKA noise probes: images drawn outside every domain's distribution to query the old model.

Probes come from a seeded `torch.Generator`, so the server can send either the pixels or only
the seed and a client regenerates exactly the same tensor.
"""

from __future__ import annotations

import torch

from ted_fl.config import Distribution, LossConfig, choices
from ted_fl.errors import unknown

DISTRIBUTIONS = choices(Distribution)  # the schema owns the allowed values


def draw_probes(
    generator: torch.Generator | None, count: int, shape: tuple[int, ...], cfg: LossConfig
) -> torch.Tensor:
    """`count` probes of `shape` from `generator` (None: torch's global RNG, as the reference).

    normal: N(ska_mean, ska_std^2); uniform: U[ska_mean - ska_std*sqrt(3), ska_mean + ska_std*sqrt(3)),
    i.e. the uniform law with the same mean and standard deviation.
    """
    size = (int(count), *(int(s) for s in shape))
    if cfg.ska_distribution == "normal":
        z = torch.randn(size, generator=generator, dtype=torch.float32)
        return z * cfg.ska_std + cfg.ska_mean
    if cfg.ska_distribution == "uniform":
        u = torch.rand(size, generator=generator, dtype=torch.float32)
        half = cfg.ska_std * 3.0**0.5
        return (u * 2.0 - 1.0) * half + cfg.ska_mean
    raise unknown("probe distribution", cfg.ska_distribution, DISTRIBUTIONS, "loss.ska_distribution")


def make_probes(seed: int, count: int, shape: tuple[int, ...], cfg: LossConfig) -> torch.Tensor:
    """(count, *shape) float32 probes from a generator seeded with `seed` (shape e.g. (1, H, W))."""
    gen = torch.Generator().manual_seed(int(seed))
    return draw_probes(gen, count, shape, cfg)
