"""ImageProperties, the one type for image geometry: pymia's semantics and its wire form."""

from __future__ import annotations

import numpy as np

from patchwire.wire.geometry import ImageProperties


def test_wire_round_trip_keeps_every_field() -> None:
    p = ImageProperties((181, 217, 181), (-90.0, -126.0, -72.0), (1.0, 1.0, 1.0), tuple(np.eye(3).ravel()), 3, 2, 8)
    back = ImageProperties.from_proto(p.to_proto())
    assert back == p
    assert (back.number_of_components_per_pixel, back.pixel_id, back.dimensions) == (2, 8, 3)
    assert back.shape == (181, 217, 181)[::-1]


def test_values_are_normalised_and_equality_is_pymias() -> None:
    a = ImageProperties(np.array([4, 5, 6]), [0, 0, 0], [1, 1, 1], np.eye(3).ravel())
    assert a.size == (4, 5, 6) and all(isinstance(v, int) for v in a.size)
    assert a.origin == (0.0, 0.0, 0.0) and all(isinstance(v, float) for v in a.origin)
    assert a.dimensions == 3 and a.is_three_dimensional() and not a.is_vector_image()
    b = ImageProperties((4, 5, 6), (0, 0, 0), (1, 1, 1), tuple(np.eye(3).ravel()), 3, 1, 9)
    assert a == b and hash(a) == hash(b)  # as pymia: components and pixel type are not compared
    assert a != ImageProperties((4, 5, 7), (0, 0, 0), (1, 1, 1), tuple(np.eye(3).ravel()))
