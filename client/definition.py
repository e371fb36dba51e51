"""Keys and dataset locations, with the same names and string values as ``pymia.data.definition`` (defined in
:mod:`patchwire.wire.definition`, shared with the server)."""

from patchwire.wire.definition import *  # noqa: F403
from patchwire.wire.definition import __all__ as __all__
