"""Running statistics of a calibration pass, kept on the model's device until the pass ends.

`ExpertMaxima` (max |output| per expert, its channel, tokens seen), `HiddenMaxima` (max |h| of
a decoder layer's residual stream and where it was) and `MedianSample` (a bounded uniform
sample of |h| for the median). Updated by the hooks of `capture/calibration/calibrator.py`.
"""

from __future__ import annotations

import math

import torch

# |h| values kept per layer for the median: exact below this, a uniform random sample of
# between this and twice this many values above it.
MEDIAN_SAMPLE_CAP = 1 << 20
MEDIAN_SAMPLE_SEED = 0


class ExpertMaxima:
    """Per expert of one layer: running max |output|, its channel, tokens seen."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.max = torch.zeros(count, dtype=torch.float32, device=device)
        self.channel = torch.full((count,), -1, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(count, dtype=torch.int64, device=device)

    def update(self, experts: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """`experts`: ids [n] (on device); `outputs`: one [tokens, hidden] output per id."""
        per_channel = torch.stack([o.detach().abs().float().amax(dim=0) for o in outputs])
        values, channels = per_channel.max(dim=1)
        current = self.max[experts]
        better = values > current
        self.max[experts] = torch.where(better, values, current)
        self.channel[experts] = torch.where(better, channels, self.channel[experts])
        counts = torch.tensor([o.shape[0] for o in outputs], dtype=torch.int64, device=self.tokens.device)
        self.tokens[experts] += counts


class MedianSample:
    """A bounded uniform random sample of |h| values for a median; every value while they fit.

    Each value draws a uniform key (seeded generator); the sample is every value whose key
    lies below `threshold`. While `cap` values or fewer were seen the threshold is 1 and the
    median is exact. Past 2 * cap kept values the threshold drops to the cap-th smallest
    key, so the sample stays a uniform one of cap..2*cap values: no channel or position is
    favoured, whatever the hidden size (a fixed stride would keep whole channels only).
    """

    def __init__(self, cap: int = MEDIAN_SAMPLE_CAP, seed: int = MEDIAN_SAMPLE_SEED) -> None:
        self.cap = cap
        self.seed = seed
        self.threshold = 1.0
        self.seen = 0
        self.values: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.kept = 0
        self._generator: torch.Generator | None = None

    @property
    def exact(self) -> bool:
        return self.threshold >= 1.0

    def add(self, values: torch.Tensor) -> None:
        values = values.reshape(-1)
        if self._generator is None:
            self._generator = torch.Generator(device=values.device).manual_seed(self.seed)
        keys = torch.rand(values.numel(), generator=self._generator, device=values.device)
        self.seen += values.numel()
        if not self.exact:
            keep = keys < self.threshold
            values, keys = values[keep], keys[keep]
        self.values.append(values)
        self.keys.append(keys)
        self.kept += values.numel()
        if self.kept > 2 * self.cap:
            keys = torch.cat(self.keys)
            smallest, index = torch.topk(keys, self.cap, largest=False, sorted=False)
            self.values, self.keys = [torch.cat(self.values)[index]], [smallest]
            self.kept = self.cap
            self.threshold = float(smallest.max())

    def median(self) -> float:
        if not self.kept:
            return math.nan
        # the lower median for an even count, as torch.median gives
        return float(torch.cat(self.values).median())


class HiddenMaxima:
    """Per decoder layer: running max |h| with its channel, sequence and position; a median sample."""

    def __init__(self, device: torch.device, median_cap: int | None = None) -> None:
        self.max = torch.zeros((), dtype=torch.float32, device=device)
        self.channel = torch.full((), -1, dtype=torch.int64, device=device)
        self.seq = torch.full((), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((), -1, dtype=torch.int64, device=device)
        self.sample = MedianSample(MEDIAN_SAMPLE_CAP if median_cap is None else median_cap)

    def update(
        self, hidden: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, seq_offset: int
    ) -> None:
        a = hidden.detach().abs().float() * valid.unsqueeze(-1)
        width = a.shape[-1]
        value, flat = a.reshape(-1).max(dim=0)
        row = flat // width
        better = value > self.max
        self.max = torch.where(better, value, self.max)
        self.channel = torch.where(better, flat % width, self.channel)
        self.seq = torch.where(better, row // a.shape[1] + seq_offset, self.seq)
        self.pos = torch.where(better, positions.reshape(-1)[row], self.pos)
        self.sample.add(a[valid].reshape(-1))
