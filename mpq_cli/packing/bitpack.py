"""Dense little-endian bit packing of unsigned integer fields into ``uint8``.

The layout (``docs/format.md`` spells it out for readers in other languages):
``count`` fields of ``width`` bits form one bit stream; bit ``t`` (LSB = 0) of
field ``j`` is stream bit ``p = j * width + t``, which lives in byte ``p // 8`` at
bit position ``p % 8`` (LSB-first). The last byte is padded with zero bits.
``count`` fields of ``width`` bits take exactly ``ceil(count * width / 8)`` bytes.

Worked example (a test reproduces it): the 3-bit fields ``[5, 3, 6]`` are the
stream bits ``1 0 1 | 1 1 0 | 0 1 1`` (each field LSB first); stream bits 0..7 make
byte 0 with stream bit 0 as its LSB, ``0b10011101 = 0x9D``, and stream bit 8 makes
byte 1, ``0x01``. Two bytes: ``ceil(9 / 8)``.

Signed fields use two's complement of ``width`` bits (:func:`to_twos_complement`).

Everything is vectorised with NumPy; the only Python loops run over a field's bit
positions (below 8 bits) or the 32 fields of a group (above), and over chunks of 2**18
fields (to bound temporary memory and keep each pass in cache).
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 32
_CHUNK = 1 << 18  # fields per chunk; a multiple of 32, so every chunk starts on a byte (and group) boundary


def packed_nbytes(count: int, width: int) -> int:
    """Bytes that ``count`` fields of ``width`` bits take: ``ceil(count * width / 8)``."""
    return (count * width + 7) // 8


def _container(width: int):
    """The narrowest unsigned dtype that holds a field (narrow dtypes make the shifts faster)."""
    return np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"field width must be in 1..{MAX_WIDTH}, got {width}")


def _check_range(fields: np.ndarray, width: int) -> None:
    if fields.size and (fields.min() < 0 or int(fields.max()) >= (1 << width)):
        raise ValueError(f"fields must lie in [0, 2**{width})")


def pack_bits(fields: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ``fields`` (any shape, read in C order) at ``width`` bits each.

    Args:
        fields: non-negative integers, each ``< 2**width``.
        width: bits per field, 1..32.

    Returns:
        ``uint8`` array of ``packed_nbytes(fields.size, width)`` bytes.
    """
    _check_width(width)
    flat = np.ascontiguousarray(fields).reshape(-1)
    container = np.dtype(_container(width))
    if width in (8, 16, 32):  # byte-aligned fields: the layout is plain little-endian bytes
        _check_range(flat, width)
        return flat.astype(container.newbyteorder("<"), copy=False).view(np.uint8).copy()
    out = np.empty(packed_nbytes(flat.size, width), dtype=np.uint8)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        _check_range(chunk, width)  # chunk by chunk: each is still in cache when it is packed
        chunk = chunk.astype(container, copy=False)
        packed = _pack_bit_matrix(chunk, width) if width < 8 else _pack_groups(chunk, width)
        offset = start * width // 8
        out[offset : offset + packed.size] = packed
    return out


# Two ways to the same stream, each the faster one for its widths (benchmarks/packing.py). Below 8
# bits: a (fields, width) matrix of bits, packed by np.packbits; the Python loop runs over the
# width's bit positions.
def _pack_bit_matrix(chunk: np.ndarray, width: int) -> np.ndarray:
    bits = np.empty((chunk.size, width), dtype=np.uint8)  # row j is field j, LSB first
    for t in range(width):
        bits[:, t] = (chunk >> t) & 1
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack_bit_matrix(data: np.ndarray, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(data, count=count * width, bitorder="little").reshape(count, width)
    values = np.zeros(count, dtype=_container(width))
    for t in range(width):
        values |= bits[:, t].astype(values.dtype) << t
    return values  # in the narrow container: the caller's assignment widens it without another copy


# Above 8 bits: 32 fields of ``width`` bits are exactly ``width`` little-endian 32-bit words of the
# stream (field i starts at bit i * width of its group, split across two words where it straddles
# one). Both directions first lay the chunk out as 32 contiguous rows (field i of every group, or
# word w of every group), so that each of the 32 shift-and-or passes reads and writes contiguous
# memory; a chunk of 2**18 fields keeps those passes in cache. The Python loops run over the 32
# fields of a group, never over weights or bits.
_GROUP = 32


def _pack_groups(chunk: np.ndarray, width: int) -> np.ndarray:
    count = chunk.size
    groups = -(-count // _GROUP)
    if count % _GROUP:
        padded = np.zeros(groups * _GROUP, dtype=chunk.dtype)
        padded[:count] = chunk
        chunk = padded
    # row i: field i of every group, widened first (NumPy 1 shifts a uint16 in uint16 whatever the out dtype)
    fields = np.ascontiguousarray(chunk.reshape(groups, _GROUP).T, dtype=np.uint32)
    words = np.zeros((width, groups), dtype=np.uint32)  # row w: word w of every group
    part = np.empty(groups, dtype=np.uint32)
    for i in range(_GROUP):
        word, shift = divmod(i * width, 32)
        np.left_shift(fields[i], np.uint32(shift), out=part)  # bits past 32 fall off
        np.bitwise_or(words[word], part, out=words[word])
        if shift + width > 32:  # the field's high bits continue in the next word
            np.right_shift(fields[i], np.uint32(32 - shift), out=part)
            np.bitwise_or(words[word + 1], part, out=words[word + 1])
    group_words = np.ascontiguousarray(words.T).astype("<u4", copy=False)  # (groups, width)
    return group_words.view(np.uint8).reshape(-1)[: packed_nbytes(count, width)]


def _unpack_groups(data: np.ndarray, width: int, count: int) -> np.ndarray:
    groups = -(-count // _GROUP)
    if data.size != groups * width * 4:
        padded = np.zeros(groups * width * 4, dtype=np.uint8)
        padded[: data.size] = data
        data = padded
    words = np.ascontiguousarray(data.view("<u4").reshape(groups, width).T)  # row w: word w of every group
    fields = np.empty((_GROUP, groups), dtype=np.uint32)
    part = np.empty(groups, dtype=np.uint32)
    mask = np.uint32((1 << width) - 1)
    for i in range(_GROUP):
        word, shift = divmod(i * width, 32)
        np.right_shift(words[word], np.uint32(shift), out=fields[i])
        if shift + width > 32:
            np.left_shift(words[word + 1], np.uint32(32 - shift), out=part)
            np.bitwise_or(fields[i], part, out=fields[i])
        np.bitwise_and(fields[i], mask, out=fields[i])
    return fields.T.reshape(-1)[:count]  # uint32; the caller's assignment widens it


def unpack_bits(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` fields of ``width`` bits as ``int64``.

    Raises:
        ValueError: ``data`` does not hold exactly ``packed_nbytes(count, width)`` bytes,
            or its padding bits are not zero.
    """
    _check_width(width)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    expected = packed_nbytes(count, width)
    if data.size != expected:
        raise ValueError(f"expected {expected} bytes for {count} fields of {width} bits, got {data.size}")
    used_bits = count * width
    if used_bits % 8 and data[-1] >> (used_bits % 8):
        raise ValueError("padding bits after the last field are not zero")
    if width in (8, 16, 32):
        return data.view(np.dtype(_container(width)).newbyteorder("<")).astype(np.int64)
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        offset = start * width // 8
        unpack = _unpack_bit_matrix if width < 8 else _unpack_groups
        out[start : start + n] = unpack(data[offset : offset + packed_nbytes(n, width)], width, n)
    return out


def twos_complement_width(lowest: int, highest: int) -> int:
    """Fewest bits whose two's complement range ``[-2**(w-1), 2**(w-1) - 1]`` holds both values (at least 1)."""
    width = 1
    while not (-(1 << (width - 1)) <= lowest and highest <= (1 << (width - 1)) - 1):
        width += 1
    return width


def to_twos_complement(values: np.ndarray, width: int) -> np.ndarray:
    """Signed integers as unsigned ``width``-bit two's complement fields."""
    _check_width(width)
    return np.asarray(values, dtype=np.int64) & ((1 << width) - 1)


def from_twos_complement(fields: np.ndarray, width: int) -> np.ndarray:
    """Unsigned ``width``-bit fields back to signed integers (sign extension)."""
    _check_width(width)
    half = np.int64(1 << (width - 1))
    values = np.bitwise_xor(np.asarray(fields, dtype=np.int64), half)  # flips the sign bit: v + half in [0, 2 half)
    values -= half
    return values
