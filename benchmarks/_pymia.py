"""pymia 0.3.4, the baseline the benchmark measures patchwire against, imported with the NumPy aliases it needs.

pymia 0.3.4's data package still uses ``np.float``, ``np.int``, ``np.object`` and ``np.bool``, removed in NumPy
1.24; they are put back as the builtins they stood for before pymia is imported. The tests do the same through their
oracle helper; this script keeps its own few lines rather than reach into the test tree, since patchwire itself never
imports pymia.
"""

from __future__ import annotations

import builtins
import functools
import types
import warnings
from typing import Any

import numpy as np


@functools.cache
def load_pymia() -> types.SimpleNamespace:
    """pymia's ``extraction``, ``transformation`` and ``assembler`` modules, after restoring the NumPy aliases."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy < 1.24 warns when the deprecated aliases are touched
        missing = [name for name in ("float", "int", "object", "bool") if not hasattr(np, name)]
    for name in missing:
        setattr(np, name, getattr(builtins, name))
    import pymia.data.assembler
    import pymia.data.extraction
    import pymia.data.transformation

    return types.SimpleNamespace(
        extraction=pymia.data.extraction,
        transformation=pymia.data.transformation,
        assembler=pymia.data.assembler,
    )


def load_pymia_torch() -> Any:
    """pymia's PyTorch backend (``PytorchDatasetAdapter``)."""
    load_pymia()
    import pymia.data.backends.pytorch

    return pymia.data.backends.pytorch
