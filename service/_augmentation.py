"""Random transforms (pymia.data.augmentation and the TorchIO/MONAI first choices), interpreted from their specs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from patchwire.service._errors import InvalidArgument

__all__ = ["AUGMENTATIONS", "RandomStep", "compile_augmentation"]

RandomStep = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]

AUGMENTATIONS: frozenset[str] = frozenset()
"""Transform oneof names of the random transforms."""


def compile_augmentation(kind: str, sub: Any, where: str, max_bytes: int | None) -> RandomStep:
    raise InvalidArgument(f"{where}: unknown transform {kind!r}")
