"""pymia 0.3.4 as a test oracle: the one place that restores the NumPy aliases pymia needs and imports it.

pymia 0.3.4's data package still uses ``np.float``, ``np.int``, ``np.object`` and ``np.bool``, removed in NumPy 1.24.
:func:`load_pymia` puts them back as the builtins NumPy < 1.24 aliased (so behaviour matches pymia on NumPy 1.23)
and returns pymia's data modules. Only tests import pymia; patchwire itself never does.
"""

from __future__ import annotations

import functools
import types
import warnings

import numpy as np


@functools.cache
def load_pymia() -> types.SimpleNamespace:
    """Returns ``pymia.data``'s ``extraction``, ``creation``, ``definition``, ``transformation``, ``assembler`` and
    ``conversion`` modules (plus ``data`` itself), after restoring the NumPy aliases pymia 0.3.4 uses."""
    for name, obj in (("float", float), ("int", int), ("object", object), ("bool", bool)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPy < 1.24 warns when the deprecated aliases are touched
            present = hasattr(np, name)
        if not present:
            setattr(np, name, obj)

    import pymia.data
    import pymia.data.assembler
    import pymia.data.conversion
    import pymia.data.creation
    import pymia.data.definition
    import pymia.data.extraction
    import pymia.data.transformation

    return types.SimpleNamespace(
        data=pymia.data,
        extraction=pymia.data.extraction,
        creation=pymia.data.creation,
        definition=pymia.data.definition,
        transformation=pymia.data.transformation,
        assembler=pymia.data.assembler,
        conversion=pymia.data.conversion,
    )
