"""Image geometry, with the same names and meaning as ``pymia.data.conversion.ImageProperties`` (defined in
:mod:`patchwire.wire.geometry`, the one type both ends use)."""

from patchwire.wire.geometry import ImageProperties

__all__ = ["ImageProperties"]
