"""The skull-stripped variant of the phantom: zero outside a brain mask, the phantom's values inside, labels kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _data import MASK_MARGIN_VOXELS, dataset_path, ensure_dataset, skull_strip, zero_fractions
from _plan import SMOKE
from scipy import ndimage

from patchwire.service._phantom import make_phantom_subject

SHAPE = (24, 40, 36)


def test_zero_outside_the_brain_and_the_phantom_inside() -> None:
    phantom = make_phantom_subject(0, SHAPE)
    stripped = skull_strip(phantom)
    labels = phantom.categories["labels"]["GT"]
    np.testing.assert_array_equal(stripped.categories["labels"]["GT"], labels)
    mask = ndimage.binary_fill_holes(ndimage.binary_dilation(labels > 0, iterations=MASK_MARGIN_VOXELS))
    for name, image in phantom.categories["images"].items():
        out = stripped.categories["images"][name]
        assert out.dtype == np.float32
        assert not np.any(out[~mask]), name
        np.testing.assert_array_equal(out[mask], image[mask])
    assert np.all(phantom.categories["images"]["T1"] > 0)  # the phantom's own background is noise, never zero
    assert mask[labels > 0].all() and 0.1 < mask.mean() < 0.9


def test_the_file_states_its_zero_background(tmp_path: Path) -> None:
    path, seconds = ensure_dataset(SMOKE, tmp_path, skull_stripped=True)
    assert path == dataset_path(SMOKE, tmp_path, skull_stripped=True) and seconds is not None
    assert "skull-stripped" in path.name and path != dataset_path(SMOKE, tmp_path)
    assert ensure_dataset(SMOKE, tmp_path, skull_stripped=True) == (path, None)  # cached
    stats = zero_fractions(path)
    subjects = [skull_strip(make_phantom_subject(i, SMOKE.shape)) for i in range(SMOKE.subjects)]
    images = np.stack([np.stack(list(s.categories["images"].values()), axis=-1) for s in subjects])
    labels = np.stack([s.categories["labels"]["GT"] for s in subjects])
    assert stats["image_zero_fraction"] == np.count_nonzero(images == 0) / images.size
    assert stats["labelled_fraction"] == np.count_nonzero(labels) / labels.size
    assert 0.5 < stats["image_zero_fraction"] < 0.95
