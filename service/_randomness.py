"""Per-sample randomness: a sample's random draws (patch positions, random transforms) depend only on (seed, epoch,
position), never on the order, batching, worker or rank that produces it, so an epoch is reproducible byte for byte
and the same whatever the number of consumers (MosaicML Streaming's elastic determinism, done on the server)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Draw"]


@dataclass(frozen=True)
class Draw:
    """The randomness of one sample.

    ``position`` is the sample's position in the epoch's global order for a stream (so two draws of one sample in an
    epoch sampled with replacement differ) and its sample index for GetSamples; ``index`` is its sample index, which
    seeds what belongs to the sample itself (a sampled patch's place)."""

    seed: int
    epoch: int
    position: int
    index: int

    def generator(self, stream: int) -> np.random.Generator:
        """Generator number ``stream`` of this sample's position (each random transform of a chain has its own)."""
        return np.random.default_rng([int(self.seed), int(self.epoch), int(self.position), 1 + int(stream)])

    def index_generator(self) -> np.random.Generator:
        """A generator of this sample's index in this epoch (a patch sampler's)."""
        return np.random.default_rng([int(self.seed), int(self.epoch), int(self.index), 0])

    @classmethod
    def of_index(cls, index: int, seed: int = 0, epoch: int = 0) -> Draw:
        """A sample's draw outside a stream (GetSamples, SelectIndices): its position is its index."""
        return cls(seed, epoch, index, index)
