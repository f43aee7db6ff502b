"""Bootstrap intervals of per-image scores, for one accuracy and for a paired difference."""
from __future__ import annotations

import torch


def bootstrap_interval(values: torch.Tensor, level: float = 0.95, draws: int = 10_000, seed: int = 0) -> tuple:
    """The mean of per-image ``values`` and its percentile bootstrap interval (resampling images). For a
    paired comparison pass the per-image differences (defended minus reference on the same images)."""
    values = values.double().flatten()
    if len(values) == 0:
        raise ValueError("no values to bootstrap")
    generator = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(values), (draws, len(values)), generator=generator)].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return values.mean().item(), low, high
