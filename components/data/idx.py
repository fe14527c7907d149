"""Reader for the IDX format of (Fashion-)MNIST: a 4-byte magic, big-endian sizes, then the data.

Magic: two zero bytes, a type code (0x08 = unsigned byte), and the number of dimensions.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_TYPE_CODES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """The bytes are not a well-formed IDX array."""


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an (uncompressed) IDX byte string into an array of its declared shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{source}: not an IDX file (bad magic {data[:4]!r})")
    type_code, ndim = data[2], data[3]
    if type_code not in _TYPE_CODES:
        raise IdxFormatError(f"{source}: unknown IDX element type 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise IdxFormatError(f"{source}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(_TYPE_CODES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = data[header_end:]
    if len(payload) != expected:
        raise IdxFormatError(
            f"{source}: IDX payload is {len(payload)} bytes, header {shape} needs {expected}"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def read_idx_gz(path: Path) -> tuple[np.ndarray, bytes]:
    """Read a gzipped IDX file; returns the array and the decompressed bytes (for checksums)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise IdxFormatError(f"{path}: not a readable gzip file: {exc}") from exc
    return parse_idx(raw, str(path)), raw
