"""Tensor payload compression: the codecs, which tensors each applies to, and decoding that a hostile peer cannot
turn into a crash, an overrun or memory it did not pay for.

Codecs (``Tensor.compression``, named as clients and ``patchwire serve --compression`` name them):

- ``lz4`` (``COMPRESSION_LZ4``): one LZ4 block over the whole payload. The original label-map codec
  (``integer_compression``); without a shuffle it does little for floats.
- ``shuffle-lz4`` (``COMPRESSION_SHUFFLE_LZ4``) and ``shuffle-zstd`` (``COMPRESSION_SHUFFLE_ZSTD``): *blosc2 frames*.
  The raw payload is cut into pieces of at most :data:`FRAME_BYTES`, and each piece is one blosc2 chunk, here
  called a frame: byte shuffle with typesize = the dtype's itemsize (the bytes of equal significance of all elements
  side by side: the exponents of float32 intensities, the zero high bytes of small integers), then LZ4 or
  Zstandard. Frames follow one another in the payload; every TensorChunk message of a chunked payload holds whole
  frames, so a receiver decompresses each message straight into the tensor's buffer as it arrives, and only ever
  holds the decompressed tensor. Where a frame ends is the sender's choice within the rules that
  :class:`FrameDecoder` checks: at most :data:`FRAME_BYTES` raw bytes, whole elements, and at least
  :data:`MIN_FRAME_BYTES` except for the payload's last frame. This sender cuts a stacked tensor at its samples
  where they are that large (:func:`frame_pieces`): a sample's frames then do not depend on the batch it travels
  in, so a server can keep samples compressed (:class:`Packed`) and send them again without compressing them.

Measured on a 181x217x181 phantom subject, one core, 2 MiB frames (compression ratio, compress / decompress speed
in GB/s of raw bytes):

================================  ===================  ===================  ===================
codec, clevel                     float32, skull-       uint8 label map      float32 with noisy
                                  stripped (82% zero)                        background
================================  ===================  ===================  ===================
shuffle-lz4, 1 (used)             6.6x, 3.6 / 9.9      24x, 3.1 / 5.1       1.15x, 1.3 / 2.6
shuffle-lz4, 5                    6.6x, 3.5 / 6.4      24x, 3.4 / 5.4       1.15x, 1.4 / 2.9
shuffle-zstd, 1 (used)            7.4x, 1.4 / 5.0      89x, 2.4 / 3.3       1.25x, 0.6 / 2.3
shuffle-zstd, 3                   7.4x, 0.3 / 3.4      89x, 0.8 / 2.9       1.25x, 0.3 / 2.1
lz4 (no shuffle)                  5.4x, 1.8 / 0.7      25x, 2.8 / 3.6       1.0x
================================  ===================  ===================  ===================

Higher levels buy almost nothing on this data and cost up to 4x the time: both blosc2 codecs use level 1.

Which tensors: a :class:`Policy` names the codec for integer and bool tensors and the one for the others (floats);
tensors under :data:`MIN_COMPRESS_BYTES`, and tensors that do not get smaller (noise), travel raw.

Safety. A compressed payload never decides how much memory its receiver allocates: the buffer is the tensor's
shape x dtype, bounded by the receiver's limits before anything is allocated. A payload may announce at most
:func:`max_compressed_bytes` for that size. Before a frame is decompressed its header is checked
(:class:`FrameDecoder`): whole frame present, its raw size within the frame rules and the bytes left, typesize the
dtype's itemsize,
the announced codec, byte shuffle only, no dictionary, no lazy or user-defined parts, no "uninitialised" special
value (which would hand out whatever the buffer held before); blosc2 then decompresses exactly that piece into the
tensor's buffer, and the frames together must fill it exactly. Any violation is a :class:`WireError`.

CPU: blosc2 releases the GIL while it compresses and decompresses (this module turns that on when it first loads
blosc2), so the server's executor threads and the client's decoding threads compress in parallel with everything
else; each call uses one thread (the callers bring their own). blosc2 is imported on first use (it takes about
0.2 s to import).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import lz4.block
import numpy as np

from patchwire.v1 import tensor_pb2
from patchwire.wire.errors import WireError

__all__ = [
    "AUTO_PREFERENCE",
    "COMPRESSIBLE_KINDS",
    "FRAME_BYTES",
    "MIN_COMPRESS_BYTES",
    "MIN_FRAME_BYTES",
    "NAMES",
    "NONE",
    "RAW",
    "SUPPORTED",
    "CodecName",
    "Compression",
    "FrameDecoder",
    "Frames",
    "Packed",
    "Policy",
    "codec_from_name",
    "codec_name",
    "compress",
    "compression_from_name",
    "decompress",
    "frame_pieces",
    "framed",
    "max_compressed_bytes",
    "offer_from_text",
    "pack",
    "piece_views",
    "task_groups",
]

T = TypeVar("T")

Compression = tensor_pb2.Compression
NONE = Compression.COMPRESSION_UNSPECIFIED
"""No compression: the raw element bytes."""
#: numpy dtype kinds that ``integer_compression`` applies to: bool and (un)signed integers (label maps, masks).
COMPRESSIBLE_KINDS = "biu"
#: Smaller tensors are never compressed: a few KiB cost more to compress than to send.
MIN_COMPRESS_BYTES = 4096
#: Most raw bytes of one blosc2 frame. Part of the wire format.
FRAME_BYTES = 2 << 20
#: Fewest raw bytes of a blosc2 frame other than a payload's last. Part of the wire format: it bounds the number of
#: frames of a payload, and so the work a hostile payload can make its receiver do per byte (64 frames per MiB).
MIN_FRAME_BYTES = 16 << 10
CodecName = Literal["lz4", "shuffle-lz4", "shuffle-zstd"]
"""A codec's name (what ``ServerConfig.compressions`` holds)."""
#: The names of the codecs, and their wire values.
NAMES: dict[str, Compression.ValueType] = {
    "lz4": Compression.COMPRESSION_LZ4,
    "shuffle-lz4": Compression.COMPRESSION_SHUFFLE_LZ4,
    "shuffle-zstd": Compression.COMPRESSION_SHUFFLE_ZSTD,
}
#: Every codec this build can encode and decode, by name (what a server offers by default).
SUPPORTED: tuple[CodecName, ...] = ("lz4", "shuffle-lz4", "shuffle-zstd")
#: The codec a client's ``compression="auto"`` picks: the first of these that the server offers. shuffle-lz4
#: compresses at about 3.5 GB/s per core, faster than a 10 Gbit/s link carries; shuffle-zstd is for slower links.
AUTO_PREFERENCE: tuple[str, ...] = ("shuffle-lz4", "shuffle-zstd", "lz4")

_FRAMED: dict[int, tuple[str, int]] = {
    # wire value -> (blosc2 codec name, the codec's number in a blosc2 header's flags)
    Compression.COMPRESSION_SHUFFLE_LZ4: ("LZ4", 1),
    Compression.COMPRESSION_SHUFFLE_ZSTD: ("ZSTD", 4),
}
_CLEVEL = 1  # see the module's table: higher levels gain under 1% here and cost up to 4x the time
_HEADER = 32  # a blosc2 chunk's header (its extended form, which blosc2 always writes)
_SHUFFLE = 1  # blosc2's filter code of the byte shuffle
_MEMCPYED = 0x02  # flags: the blocks are stored as they are (incompressible input; the codec bits say nothing then)
_EXTENDED = 0x05  # flags: both shuffle bits set mark blosc2's extended header
_SPECIAL_UNINIT = 4  # blosc2_flags bits 4-6: "values not initialised" (nothing is written)
_blosc2: Any = None
_blosc2_lock = threading.Lock()


def _lib() -> Any:
    """blosc2, imported on first use, with the GIL released during its compression and decompression calls."""
    global _blosc2
    if _blosc2 is None:
        with _blosc2_lock:
            if _blosc2 is None:
                import blosc2

                blosc2.set_releasegil(True)
                _blosc2 = blosc2
    return _blosc2


def codec_from_name(name: str) -> Compression.ValueType:
    """The wire value of a codec name (``'lz4'``, ``'shuffle-lz4'``, ``'shuffle-zstd'``); ValueError naming the
    codecs for anything else."""
    try:
        return NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r} (codecs: {', '.join(SUPPORTED)})") from None


def codec_name(codec: int) -> str:
    """The name of a codec's wire value (its enum name for one this build does not know)."""
    for name, value in NAMES.items():
        if value == codec:
            return name
    if codec == NONE:
        return "none"
    return f"codec {codec}"


def offer_from_text(text: str) -> tuple[str, ...]:
    """The codecs a server offers from ``--compression``'s text: comma-separated names, or ``none`` for none;
    ValueError naming the codecs for an unknown one."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        return ()
    for name in names:
        codec_from_name(name)
    if not names:
        raise ValueError(f"give codec names ({', '.join(SUPPORTED)}) or 'none'")
    return tuple(dict.fromkeys(names))


def compression_from_name(name: str | None) -> Compression.ValueType:
    """The wire value of ``label_compression``: None (raw) or a codec name; ValueError for anything else."""
    if name is None:
        return NONE
    if name not in NAMES:
        raise ValueError(f"label_compression must be None or one of {', '.join(SUPPORTED)}, got {name!r}")
    return NAMES[name]


def framed(codec: int) -> bool:
    """Whether payloads of ``codec`` are blosc2 frames (decoded frame by frame as they arrive)."""
    return codec in _FRAMED


def max_compressed_bytes(raw: int, codec: int = Compression.COMPRESSION_LZ4) -> int:
    """The most bytes a payload of ``codec`` may announce for ``raw`` element bytes: LZ4's worst case, or for blosc2
    frames the raw bytes plus one header per frame."""
    if framed(codec):
        return raw + (raw // MIN_FRAME_BYTES + 1) * _HEADER
    return raw + raw // 255 + 16


@dataclass(frozen=True)
class Policy:
    """Which codec each tensor travels with: ``integer`` for integer and bool tensors, ``other`` for the rest
    (floats); :data:`NONE` sends them raw. ``threads``: where the frames of one payload are compressed in parallel
    (a server's pool; None: one after another on the calling thread)."""

    integer: int = NONE
    other: int = NONE
    threads: Executor | None = field(default=None, compare=False)

    @classmethod
    def of_request(cls, compression: int, integer_compression: int) -> Policy:
        """A request's policy: ``compression`` (when set) for every tensor, else ``integer_compression`` for integer
        and bool tensors only."""
        if compression != NONE:
            return cls(compression, compression)
        return cls(integer_compression, NONE)

    @property
    def active(self) -> bool:
        return self.integer != NONE or self.other != NONE

    def codec(self, dtype: np.dtype[Any]) -> int:
        return self.integer if dtype.kind in COMPRESSIBLE_KINDS else self.other


RAW = Policy()
"""Every tensor raw."""


class Frames:
    """A payload of blosc2 frames: ``frames`` (bytes, one frame each), ``nbytes`` in all."""

    def __init__(self, frames: Sequence[bytes]) -> None:
        self.frames = frames
        self.nbytes = sum(len(f) for f in frames)

    def joined(self) -> bytes:
        return b"".join(self.frames)

    def messages(self, most: int) -> Iterator[list[bytes]]:
        """The frames grouped for chunk messages: whole frames, up to ``most`` bytes a group (a larger frame alone)."""
        group: list[bytes] = []
        size = 0
        for frame in self.frames:
            if group and size + len(frame) > most:
                yield group
                group, size = [], 0
            group.append(frame)
            size += len(frame)
        if group:
            yield group


@dataclass(frozen=True, eq=False)
class Packed:
    """An array already compressed for the wire: its ``shape`` and ``dtype``, the ``codec`` (a framed one) and
    its blosc2 ``frames``, cut by :func:`frame_pieces` as one sample of a stacked tensor is. It takes an array's
    place in a sample: stacked with others like it, its frames are sent as they are."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    codec: int
    frames: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        """Raw bytes of the array."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def packed_nbytes(self) -> int:
        return sum(len(f) for f in self.frames)

    def array(self) -> np.ndarray:
        """The array again (decompressed)."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        decoder = FrameDecoder(self.codec, self.dtype.itemsize, out)
        for frame in self.frames:
            decoder.feed(frame)
        decoder.finish()
        return out.view(self.dtype).reshape(self.shape)


def pack(array: np.ndarray, policy: Policy) -> Packed | None:
    """``array`` compressed with the policy's codec for its dtype, as :class:`Packed`; None where that codec is not
    a framed one, the array holds under :data:`MIN_FRAME_BYTES` (stacked, such samples share frames) or is not a
    little-endian numeric array. Kept where compressing did not make it smaller (noise) too: its frames then hold
    the bytes as they are, 32 bytes more per frame."""
    dtype = np.dtype(array.dtype)
    codec = policy.codec(dtype)
    if not framed(codec) or array.nbytes < MIN_FRAME_BYTES or dtype.kind not in "biuf" or dtype.byteorder == ">":
        return None
    view = np.ascontiguousarray(array).reshape(-1).data.cast("B")
    frames = _frames(list(frame_pieces([view], dtype.itemsize)), dtype.itemsize, codec, policy.threads)
    return Packed(tuple(array.shape), dtype, codec, tuple(frames))


def compress(
    parts: Sequence[memoryview | Packed], nbytes: int, dtype: np.dtype[Any], policy: Policy | int
) -> bytes | Frames | None:
    """The compressed payload of ``parts`` (C-order bytes, ``nbytes`` in all, of ``dtype``; or arrays already
    :class:`Packed` with the policy's codec): LZ4 bytes or blosc2 :class:`Frames`; None where the policy sends this
    dtype raw, the payload is too small to be worth it, or compressing would not make it smaller (with packed parts
    the frames are sent whatever their size). An int ``policy`` is an ``integer_compression`` codec."""
    if not isinstance(policy, Policy):
        policy = Policy(policy, NONE)
    codec = policy.codec(dtype)
    if any(isinstance(part, Packed) for part in parts):
        return Frames(_packed_frames(parts, dtype.itemsize, codec, policy.threads))
    if codec == NONE or nbytes < MIN_COMPRESS_BYTES:
        return None
    views: list[memoryview] = parts  # type: ignore[assignment]  # (no part is Packed)
    if framed(codec):
        pieces = list(frame_pieces(views, dtype.itemsize))
        frames = Frames(_frames(pieces, dtype.itemsize, codec, policy.threads))
        return frames if frames.nbytes < nbytes else None
    if codec != Compression.COMPRESSION_LZ4:
        raise ValueError(f"unknown compression {codec}")
    raw = views[0] if len(views) == 1 else b"".join(views)
    packed: bytes = lz4.block.compress(raw, store_size=False)
    if len(packed) >= nbytes:
        return None  # incompressible (noise): the raw bytes are smaller
    return packed


def piece_views(parts: Sequence[memoryview], size: int) -> Iterator[list[memoryview]]:
    """The bytes of ``parts`` cut into pieces of ``size`` (the last one the rest), each piece as the byte views of
    the parts it spans (nothing copied): how raw chunk messages are cut, and the frames of small samples."""
    pending: list[memoryview] = []
    have = 0
    for part in parts:
        view = _byte_view(part)
        offset = 0
        while offset < len(view):
            take = min(size - have, len(view) - offset)
            pending.append(view[offset : offset + take])
            have += take
            offset += take
            if have == size:
                yield pending
                pending, have = [], 0
    if have:
        yield pending


def _byte_view(part: memoryview) -> memoryview:
    return part.cast("B") if part.format != "B" or part.ndim != 1 else part


def frame_pieces(parts: Sequence[memoryview], itemsize: int) -> Iterator[memoryview | bytes]:
    """The raw pieces that become the frames of a payload of ``parts`` (each a whole number of elements of
    ``itemsize``). Where every part holds at least :data:`MIN_FRAME_BYTES` (the samples of a stacked tensor of slices,
    patches or volumes), each part is cut on its own into the fewest pieces of at most :data:`FRAME_BYTES`, equal up
    to whole elements: views, nothing copied, and a part's pieces the same in every batch. Otherwise (small samples)
    the payload is cut into pieces of :data:`FRAME_BYTES` across parts (the last one the rest), joined copies where a
    piece spans parts."""
    views = [_byte_view(part) for part in parts]
    if not all(len(view) >= MIN_FRAME_BYTES for view in views):
        for pieces in piece_views(views, FRAME_BYTES):
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return
    for view in views:
        count = -(-len(view) // FRAME_BYTES)
        size = -(-len(view) // count // itemsize) * itemsize  # at most FRAME_BYTES (a multiple of every itemsize)
        for start in range(0, len(view), size):
            yield view[start : start + size]


def _packed_frames(
    parts: Sequence[memoryview | Packed], itemsize: int, codec: int, threads: Executor | None
) -> list[bytes]:
    """The frames of a payload of which some parts are :class:`Packed` (with ``codec``): theirs as they are, the
    other parts' (each at least :data:`MIN_FRAME_BYTES`, as packed ones are) compressed now, on ``threads``."""
    groups: list[list[bytes]] = []
    pending: list[tuple[int, memoryview | bytes]] = []
    for part in parts:
        if isinstance(part, Packed):
            if part.codec != codec:
                raise ValueError(f"a part packed with {codec_name(part.codec)} in a payload of {codec_name(codec)}")
            groups.append(list(part.frames))
            continue
        if not framed(codec) or len(_byte_view(part)) < MIN_FRAME_BYTES:
            raise ValueError(f"a raw part of {len(part)} bytes beside packed ones in a payload of {codec_name(codec)}")
        groups.append([])
        pending += [(len(groups) - 1, piece) for piece in frame_pieces([part], itemsize)]
    made = _frames([piece for _, piece in pending], itemsize, codec, threads) if pending else []
    for (slot, _), frame in zip(pending, made, strict=True):
        groups[slot].append(frame)
    return [frame for group in groups for frame in group]


def _frames(pieces: Sequence[memoryview | bytes], itemsize: int, codec: int, threads: Executor | None) -> list[bytes]:
    """The blosc2 frames of ``pieces`` (a frame each), compressed on ``threads`` when there are several (blosc2
    releases the GIL)."""
    blosc2 = _lib()
    name, _ = _FRAMED[codec]
    cparams = {
        "codec": getattr(blosc2.Codec, name),
        "clevel": _CLEVEL,
        "typesize": itemsize,
        "filters": [blosc2.Filter.SHUFFLE],
        "filters_meta": [0],
        "nthreads": 1,
    }

    def frames(group: Sequence[memoryview | bytes]) -> list[bytes]:
        return [blosc2.compress2(piece, **cparams) for piece in group]

    if threads is None or len(pieces) < 2:
        return frames(pieces)
    return [frame for group in threads.map(frames, task_groups(pieces, len)) for frame in group]


def task_groups(items: Sequence[T], nbytes: Callable[[T], int]) -> list[list[T]]:
    """``items`` in consecutive groups of about :data:`FRAME_BYTES` (``nbytes`` of each), a thread's task each when
    their compression is spread over threads: small frames (a slice each) would spend more on being handed over than
    on being compressed."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        if size >= FRAME_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes(item)
    return groups


class FrameDecoder:
    """Decodes a payload of blosc2 frames into ``out`` (uint8, exactly the tensor's raw bytes), message by message:
    :meth:`feed` takes whole frames, checks each header against what the next piece must be, and decompresses it
    in place; :meth:`finish` checks that the frames filled ``out`` exactly. Raises :class:`WireError`."""

    def __init__(self, codec: int, itemsize: int, out: np.ndarray) -> None:
        if not framed(codec):
            raise WireError(f"tensor uses an unknown compression ({codec}): upgrade patchwire")
        self._codec_bits = _FRAMED[codec][1]
        self._name = codec_name(codec)
        self._itemsize = itemsize
        self._out = out
        self._raw = len(out)
        self.offset = 0
        """Raw bytes decoded so far."""

    @property
    def done(self) -> bool:
        return self.offset == self._raw

    def feed(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Decodes the whole frames in ``data`` (one message's worth) into the next pieces of ``out``."""
        view = data.reshape(-1).data if isinstance(data, np.ndarray) else memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        pos = 0
        while pos < len(view):
            size, nbytes = self._header(view[pos:])
            target = self._out[self.offset : self.offset + nbytes]
            try:
                _lib().decompress2(view[pos : pos + size], dst=target, nthreads=1)
            except (RuntimeError, ValueError) as exc:
                raise WireError(f"{self._name} frame at raw byte {self.offset} is corrupt ({exc})") from None
            self.offset += nbytes
            pos += size

    def _header(self, frame: memoryview) -> tuple[int, int]:
        """(compressed size, raw size) of the frame at the start of ``frame``, its header checked."""
        where = f"{self._name} frame at raw byte {self.offset}"
        if self.done:
            raise WireError(f"{where}: the frames already hold all {self._raw} bytes of the tensor")
        if len(frame) < _HEADER:
            raise WireError(f"{where}: {len(frame)} bytes left, less than a frame header ({_HEADER} bytes)")
        header = bytes(frame[:_HEADER])
        nbytes = int.from_bytes(header[4:8], "little", signed=True)
        cbytes = int.from_bytes(header[12:16], "little", signed=True)
        left = self._raw - self.offset
        if not 0 < nbytes <= min(FRAME_BYTES, left) or nbytes % self._itemsize:
            raise WireError(
                f"{where}: its header says {nbytes} raw bytes; a frame holds whole elements of {self._itemsize} "
                f"bytes, at most {min(FRAME_BYTES, left)} here (the tensor has {left} bytes left)"
            )
        if nbytes < MIN_FRAME_BYTES and nbytes != left:
            raise WireError(f"{where}: {nbytes} raw bytes; only a tensor's last frame may hold under {MIN_FRAME_BYTES}")
        if not _HEADER <= cbytes <= len(frame):
            raise WireError(f"{where}: its header says {cbytes} compressed bytes, the message holds {len(frame)}")
        if cbytes > max_compressed_bytes(nbytes, Compression.COMPRESSION_SHUFFLE_LZ4):
            raise WireError(f"{where}: {cbytes} compressed bytes for {nbytes} raw bytes")
        flags, typesize, special = header[2], header[3], (header[31] >> 4) & 0x07
        if typesize != self._itemsize:
            raise WireError(f"{where}: typesize {typesize}, the tensor's itemsize is {self._itemsize}")
        if flags & _EXTENDED != _EXTENDED or flags & 0x08:
            raise WireError(f"{where}: not a blosc2 frame of this format (flags {flags:#04x})")
        if not flags & _MEMCPYED and flags >> 5 != self._codec_bits:
            raise WireError(f"{where}: compressed with blosc2 codec {flags >> 5}, not {self._name}")
        if any(code not in (0, _SHUFFLE) for code in header[16:22]):
            raise WireError(f"{where}: filters {list(header[16:22])}, only the byte shuffle is allowed")
        if header[31] & 0x8F or special >= _SPECIAL_UNINIT:
            raise WireError(f"{where}: blosc2 flags {header[31]:#04x} (dictionaries, lazy or uninitialised frames)")
        return cbytes, nbytes

    def finish(self) -> None:
        """All frames were fed: they must have filled the tensor exactly."""
        if not self.done:
            raise WireError(f"{self._name} frames decompressed to {self.offset} bytes, expected {self._raw}")


def decompress(
    compression: int, data: bytes | bytearray | memoryview | np.ndarray, expected: int, itemsize: int = 1
) -> bytearray | np.ndarray:
    """The ``expected`` raw bytes of a whole compressed payload (an inline tensor, or one that lay in shared memory);
    WireError for an unknown codec or a payload that is corrupt or does not decompress to exactly ``expected``
    bytes. ``itemsize``: the tensor's, which blosc2 frames must name as their typesize."""
    if framed(compression):
        out = np.empty(expected, dtype=np.uint8)
        decoder = FrameDecoder(compression, itemsize, out)
        if len(data):
            decoder.feed(data)
        decoder.finish()
        return out
    if compression != Compression.COMPRESSION_LZ4:
        raise WireError(f"tensor uses an unknown compression ({compression}): upgrade patchwire")
    if len(data) > max_compressed_bytes(expected):
        raise WireError(f"LZ4-compressed tensor payload of {len(data)} bytes for {expected} raw bytes")
    try:
        raw: bytearray = lz4.block.decompress(data, uncompressed_size=expected, return_bytearray=True)
    except lz4.block.LZ4BlockError as exc:
        raise WireError(f"LZ4-compressed tensor payload is corrupt: {exc}") from None
    if len(raw) != expected:
        raise WireError(f"LZ4-compressed tensor decompressed to {len(raw)} bytes, expected {expected}")
    return raw
