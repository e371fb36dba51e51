"""Image geometry, with the same names and meaning as ``pymia.data.conversion.ImageProperties``: the one type both
ends use for it (the server reads it from ``meta/image_props``, sends it as a sample value and a subject's
geometry; a client receives it and exports volumes with it)."""

from __future__ import annotations

from typing import Any

from patchwire.v1 import values_pb2

__all__ = ["ImageProperties"]


class ImageProperties:
    """Size, origin, spacing and direction of an image, as pymia's ImageProperties holds them.

    Built from the dataset's ``meta/image_props`` on the server, or from a SimpleITK image with
    :meth:`from_image`. Sizes, origins and spacings are in ITK order (x, y, z): the reverse of the numpy shape;
    ``direction`` is the row-major direction cosine matrix. Equality compares size, origin, spacing, direction and
    dimensions, as in pymia.
    """

    def __init__(
        self,
        size: tuple[int, ...],
        origin: tuple[float, ...],
        spacing: tuple[float, ...],
        direction: tuple[float, ...],
        dimensions: int | None = None,
        number_of_components_per_pixel: int = 1,
        pixel_id: int = 1,
    ) -> None:
        self.size = tuple(int(v) for v in size)
        self.origin = tuple(float(v) for v in origin)
        self.spacing = tuple(float(v) for v in spacing)
        self.direction = tuple(float(v) for v in direction)
        self.dimensions = len(self.size) if dimensions is None else int(dimensions)
        self.number_of_components_per_pixel = int(number_of_components_per_pixel)
        self.pixel_id = int(pixel_id)

    @classmethod
    def from_image(cls, image: Any) -> ImageProperties:
        """From a SimpleITK image."""
        return cls(
            image.GetSize(),
            image.GetOrigin(),
            image.GetSpacing(),
            image.GetDirection(),
            image.GetDimension(),
            image.GetNumberOfComponentsPerPixel(),
            image.GetPixelID(),
        )

    @classmethod
    def from_proto(cls, p: values_pb2.ImageProperties) -> ImageProperties:
        """From a ``patchwire.v1.ImageProperties`` message."""
        return cls(
            tuple(p.size),
            tuple(p.origin),
            tuple(p.spacing),
            tuple(p.direction),
            p.dimensions,
            p.number_of_components_per_pixel,
            p.pixel_id,
        )

    def to_proto(self) -> values_pb2.ImageProperties:
        """The wire form (``patchwire.v1.ImageProperties``)."""
        return values_pb2.ImageProperties(
            size=self.size,
            origin=self.origin,
            spacing=self.spacing,
            direction=self.direction,
            dimensions=self.dimensions,
            number_of_components_per_pixel=self.number_of_components_per_pixel,
            pixel_id=self.pixel_id,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape of an image of this geometry: ``size`` reversed (z, y, x)."""
        return self.size[::-1]

    def is_two_dimensional(self) -> bool:
        return self.dimensions == 2

    def is_three_dimensional(self) -> bool:
        return self.dimensions == 3

    def is_vector_image(self) -> bool:
        return self.number_of_components_per_pixel > 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageProperties):
            return NotImplemented
        return (
            self.size == other.size
            and self.origin == other.origin
            and self.spacing == other.spacing
            and self.direction == other.direction
            and self.dimensions == other.dimensions
        )

    def __hash__(self) -> int:
        return hash((self.size, self.origin, self.spacing, self.direction, self.dimensions))

    def __repr__(self) -> str:
        return (
            f"ImageProperties(size={self.size}, origin={self.origin}, spacing={self.spacing}, "
            f"direction={self.direction})"
        )
