"""What a streamed batch becomes when its samples' arrays differ in shape (subjects of different sizes, slices along
an axis whose length varies): the ``shapes`` option of the framework adapters.

A batch from :meth:`RemoteDatasource.batches` holds each array entry stacked (one array, samples along axis 0) or,
where the samples' arrays differ in shape or dtype, as a list of per-sample arrays. The policies:

- ``"error"``: a list of arrays is refused with a ValueError naming the entry, the shapes seen and these options
  (torch's collate would fail later with "stack expects each tensor to be equal size").
- ``"pad"``: each array entry is zero-padded at the end of every axis to the batch's largest shape (the sample sits
  at index 0 of each axis), and ``batch["padded_shapes"]`` maps each array entry to its samples' own shapes
  (int64, batch x dims), so a loss can mask the padding. Arrays of different ranks or dtypes are refused.
- ``"list"``: every array entry with at least one dimension per sample is a list of per-sample arrays (stacked ones
  too, as views), so an entry's type does not depend on the batch.
- ``"group"``: the batch becomes a list of batches, one per distinct combination of the samples' shapes (and
  dtypes), in the order in which each first appears; each keeps its samples in their order in the batch. One item
  per batch of the epoch, so every consumer still yields the same number of items.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patchwire.client import definition as defs

__all__ = ["PADDED_SHAPES", "SHAPES", "apply_shapes", "varying_entries"]

SHAPES = ("error", "pad", "list", "group")
"""The ``shapes`` policies."""
PADDED_SHAPES = "padded_shapes"
"""The batch entry that ``shapes="pad"`` adds: each array entry's per-sample shapes before padding."""


def _arrays(value: Any) -> list[np.ndarray] | None:
    """``value`` as per-sample numeric arrays when it is a list of them (an entry the server could not stack)."""
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) and v.dtype != object for v in value):
        return value
    return None


def varying_entries(batch: dict[str, Any]) -> list[str]:
    """The entries of ``batch`` whose samples' arrays could not be stacked (they differ in shape or dtype)."""
    return [key for key, value in batch.items() if _arrays(value) is not None]


def _describe(arrays: list[np.ndarray]) -> str:
    """The distinct shapes of ``arrays`` (with their dtypes where those differ), at most eight."""
    seen = sorted({(a.shape, a.dtype.str) for a in arrays})
    one_dtype = len({dtype for _, dtype in seen}) == 1
    words = [str(shape) if one_dtype else f"{shape} {np.dtype(dtype)}" for shape, dtype in seen]
    return ", ".join(words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "")


def _refuse(batch: dict[str, Any], key: str, arrays: list[np.ndarray]) -> ValueError:
    indices = [int(i) for i in np.asarray(batch.get(defs.KEY_SAMPLE_INDEX, []))[:8]]
    return ValueError(
        f"the {key!r} arrays of samples {indices}{'...' if len(arrays) > 8 else ''} differ in shape or dtype "
        f"({_describe(arrays)}), so a batch cannot stack them into one tensor. Choose what to do with "
        "shapes=...: 'pad' zero-pads each batch to its largest shape (their own shapes come in "
        f"batch[{PADDED_SHAPES!r}]), 'list' gives lists of per-sample tensors, 'group' gives each batch as a list of "
        "batches of one shape; or make the samples one shape on the server (a patch indexing, PadDataExtractor, "
        "SizeCorrection)"
    )


def apply_shapes(batch: dict[str, Any], policy: str) -> dict[str, Any] | list[dict[str, Any]]:
    """``batch`` under ``policy`` (one of :data:`SHAPES`): a batch, or for "group" a list of batches."""
    if policy == "error":
        for key, value in batch.items():
            arrays = _arrays(value)
            if arrays is not None:
                raise _refuse(batch, key, arrays)
        return batch
    if policy == "pad":
        return _padded(batch)
    if policy == "list":
        return _listed(batch)
    if policy == "group":
        return _grouped(batch)
    raise ValueError(f"shapes must be one of {SHAPES}, got {policy!r}")


def _padded(batch: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shapes: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        arrays = _arrays(value)
        if key == defs.KEY_SAMPLE_INDEX:
            out[key] = value
        elif arrays is not None:
            if len({a.ndim for a in arrays}) > 1 or len({a.dtype for a in arrays}) > 1:
                raise ValueError(
                    f"shapes='pad' cannot pad the {key!r} arrays to one shape: they differ in rank or dtype "
                    f"({_describe(arrays)})"
                )
            own = np.array([a.shape for a in arrays], dtype=np.int64)
            padded = np.zeros((len(arrays), *own.max(axis=0)), dtype=arrays[0].dtype)
            for i, a in enumerate(arrays):
                padded[i][tuple(slice(0, n) for n in a.shape)] = a
            out[key], shapes[key] = padded, own
        else:
            out[key] = value
            if isinstance(value, np.ndarray) and value.ndim > 1:
                shapes[key] = np.tile(np.asarray(value.shape[1:], dtype=np.int64), (len(value), 1))
    out[PADDED_SHAPES] = shapes
    return out


def _listed(batch: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key != defs.KEY_SAMPLE_INDEX and isinstance(value, np.ndarray) and value.ndim > 1:
            out[key] = list(value)
        else:
            out[key] = value
    return out


def _grouped(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch[defs.KEY_SAMPLE_INDEX])
    varying = {key: arrays for key, value in batch.items() if (arrays := _arrays(value)) is not None}
    if not varying:
        return [batch]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(n):
        signature = tuple((arrays[i].shape, arrays[i].dtype.str) for arrays in varying.values())
        groups.setdefault(signature, []).append(i)
    out = []
    for rows in groups.values():
        group: dict[str, Any] = {}
        for key, value in batch.items():
            if key in varying:
                group[key] = np.stack([varying[key][i] for i in rows])
            elif isinstance(value, np.ndarray):
                group[key] = value[rows]
            else:
                group[key] = [value[i] for i in rows]
        out.append(group)
    return out
