"""ScanNet's ``.sens`` container, version 4 (the layout of ScanNet's SensorData), read and written.

Little-endian. Header: uint32 version; uint64 n + n bytes sensor name; four float32 4x4
row-major matrices (colour intrinsics, colour extrinsics, depth intrinsics, depth extrinsics);
int32 colour compression (0 raw, 1 PNG, 2 JPEG); int32 depth compression (0 raw uint16,
1 zlib uint16); uint32 colour width, colour height, depth width, depth height; float32 depth
shift; uint64 frame count. Per frame: float32 4x4 camera-to-world; uint64 colour timestamp,
depth timestamp, colour byte count, depth byte count; the colour bytes; the depth bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from lift3d.pipeline.readers.base import ReaderError

VERSION = 4
COLOR_RAW, COLOR_PNG, COLOR_JPEG = 0, 1, 2
DEPTH_RAW, DEPTH_ZLIB = 0, 1
FRAME_HEAD = struct.Struct("<64sQQQQ")  # pose bytes, ts colour, ts depth, colour size, depth size
_TAIL = struct.Struct("<iiIIIIfQ")
MAX_NAME = 1 << 16


@dataclass
class SensHeader:
    sensor_name: str
    color_intrinsics: np.ndarray
    color_extrinsics: np.ndarray
    depth_intrinsics: np.ndarray
    depth_extrinsics: np.ndarray
    color_compression: int
    depth_compression: int
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int
    data_offset: int = 0  # byte offset of frame 0
    file_size: int = field(default=0, repr=False)


def read_header(f: BinaryIO, path: Path) -> SensHeader:
    """Parse the header at the file's start; ReaderError naming ``path`` if it is short or invalid."""
    size = os.fstat(f.fileno()).st_size

    def read(n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise ReaderError(f"{path}: truncated .sens header (file ends at byte {size})")
        return b

    (version,) = struct.unpack("<I", read(4))
    if version != VERSION:
        raise ReaderError(f"{path}: .sens version {version}; this reader reads version {VERSION}")
    (n_name,) = struct.unpack("<Q", read(8))
    if n_name > MAX_NAME:
        raise ReaderError(f"{path}: corrupt .sens header (sensor name length {n_name})")
    name = read(n_name).decode("utf-8", "replace")
    mats = np.frombuffer(read(256), dtype="<f4").reshape(4, 4, 4).astype(np.float64)
    cc, dc, cw, ch, dw, dh, shift, n = _TAIL.unpack(read(_TAIL.size))
    return SensHeader(name, mats[0], mats[1], mats[2], mats[3], cc, dc, cw, ch, dw, dh, float(shift), n, f.tell(), size)


def iter_frames(
    f: BinaryIO, path: Path, hd: SensHeader, keep: Callable[[int], bool]
) -> Iterator[tuple[int, np.ndarray, bytes | None, bytes | None]]:
    """Yield (index, pose 4x4 float32, colour bytes, depth bytes) per frame; bytes are None for
    frames ``keep`` rejects or whose pose is not finite (those are skipped with a seek)."""
    f.seek(hd.data_offset)
    pos = hd.data_offset
    for i in range(hd.num_frames):
        head = f.read(FRAME_HEAD.size)
        if len(head) != FRAME_HEAD.size:
            raise ReaderError(
                f"{path}: truncated at frame {i} of {hd.num_frames} (frame header at byte {pos}, "
                f"file size {hd.file_size})"
            )
        pose_b, _, _, csize, dsize = FRAME_HEAD.unpack(head)
        pos += FRAME_HEAD.size
        end = pos + csize + dsize
        if end > hd.file_size:
            raise ReaderError(
                f"{path}: truncated at frame {i} of {hd.num_frames} (image data needs bytes up to "
                f"{end}, file size {hd.file_size})"
            )
        pose = np.frombuffer(pose_b, dtype="<f4").reshape(4, 4)
        if not keep(i) or not np.isfinite(pose).all():
            if keep(i):
                yield i, pose, None, None
            f.seek(csize + dsize, 1)
        else:
            cb = f.read(csize)
            db = f.read(dsize)
            if len(cb) != csize or len(db) != dsize:
                raise ReaderError(f"{path}: truncated at frame {i} of {hd.num_frames} (image data)")
            yield i, pose, cb, db
        pos = end


def _m44(m) -> bytes:
    a = np.asarray(m, dtype="<f4")
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got {a.shape}")
    return a.tobytes()


def intrinsics44(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    m = np.eye(4)
    m[0, 0], m[1, 1], m[0, 2], m[1, 2] = fx, fy, cx, cy
    return m


def write_sens(
    path: Path,
    color_k44,
    depth_k44,
    color_hw,
    depth_hw,
    frames: Iterable[tuple[np.ndarray, bytes, bytes]],
    depth_shift: float = 1000.0,
    sensor_name: str = "lift3d-synthetic",
    frame_period_us: int = 33333,
    color_compression: int = COLOR_JPEG,
    depth_compression: int = DEPTH_ZLIB,
) -> int:
    """Write a version-4 ``.sens``; ``frames`` yields (camera-to-world 4x4, colour bytes, depth bytes).
    Returns the number of frames written (the count field is patched in at the end)."""
    name = sensor_name.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<IQ", VERSION, len(name)) + name)
        for m in (color_k44, np.eye(4), depth_k44, np.eye(4)):
            f.write(_m44(m))
        count_at = f.tell() + _TAIL.size - 8
        f.write(
            _TAIL.pack(
                color_compression, depth_compression, color_hw[1], color_hw[0], depth_hw[1], depth_hw[0], depth_shift, 0
            )
        )
        n = 0
        for pose, cb, db in frames:
            ts = n * frame_period_us
            f.write(_m44(pose) + struct.pack("<QQQQ", ts, ts, len(cb), len(db)) + cb + db)
            n += 1
        f.seek(count_at)
        f.write(struct.pack("<Q", n))
    return n
