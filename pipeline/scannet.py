"""ScanNet raw scans: ``<root>/scans/<scene>/<scene>.sens`` read directly (no export step).

The ``.sens`` container (version 4; ScanNet's SensorData format): a header (sensor name,
colour/depth intrinsics and extrinsics as 4x4 float32, compression types, colour and depth
sizes, depth shift, frame count) followed, per frame, by a 4x4 camera-to-world pose, two
timestamps, the colour bytes (JPEG) and the depth bytes (zlib of uint16). Colour (1296x968
in ScanNet) is resized to the depth grid (640x480) and the *depth* intrinsics are used.
Frames that are not kept are never decoded: the reader seeks past them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import cv2
import numpy as np

from pipeline.readers import BaseReader, Frame, ReaderError, Skip

COLOR_JPEG, DEPTH_ZLIB_USHORT = 2, 1
_FRAME_HEAD = struct.Struct("<64sQQQQ")  # pose (16 float32), ts colour, ts depth, colour bytes, depth bytes


class SensHeader:
    def __init__(self, f: BinaryIO, path: Path):
        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise ReaderError(f"{path}: truncated .sens header (file ends at byte {f.tell()})")
            return b

        (version,) = struct.unpack("<I", read(4))
        if version != 4:
            raise ReaderError(f"{path}: .sens version {version}, this reader reads version 4")
        (name_len,) = struct.unpack("<Q", read(8))
        if name_len > 4096:
            raise ReaderError(f"{path}: corrupt .sens header (sensor name length {name_len})")
        self.sensor_name = read(name_len).decode("utf-8", "replace")
        mats = np.frombuffer(read(4 * 64), dtype="<f4").reshape(4, 4, 4)
        self.color_intrinsics, self.color_extrinsics, self.depth_intrinsics, self.depth_extrinsics = mats
        self.color_compression, self.depth_compression = struct.unpack("<ii", read(8))
        self.color_width, self.color_height, self.depth_width, self.depth_height = struct.unpack("<IIII", read(16))
        (self.depth_shift,) = struct.unpack("<f", read(4))
        (self.num_frames,) = struct.unpack("<Q", read(8))
        if self.color_compression != COLOR_JPEG or self.depth_compression != DEPTH_ZLIB_USHORT:
            raise ReaderError(f"{path}: compression colour={self.color_compression} depth={self.depth_compression}; "
                              f"this reader handles JPEG colour (2) and zlib depth (1)")
        if not (self.depth_width and self.depth_height and self.color_width and self.color_height):
            raise ReaderError(f"{path}: zero image size in header")
        if not self.depth_shift > 0:
            raise ReaderError(f"{path}: depth shift {self.depth_shift} must be positive")
        k = self.depth_intrinsics
        if not (np.isfinite(k[:2, :3]).all() and k[0, 0] > 0 and k[1, 1] > 0):
            raise ReaderError(f"{path}: missing or invalid depth intrinsics {k[0, 0]}, {k[1, 1]}, {k[0, 2]}, {k[1, 2]}")


def scale_intrinsics(fx: float, fy: float, cx: float, cy: float, src_hw, dst_hw) -> np.ndarray:
    """Intrinsics for a resize src -> dst with integer coordinates at pixel centres."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], np.float32)


def read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise ReaderError(f"split file {path} not found (needed for split={path.stem.split('_')[-1]!r}); "
                          f"use split: all or add the file")
    return sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})


class Reader(BaseReader):
    kind = "scannet"
    extra_keys = {}

    def scans_dir(self) -> Path:
        return self.root / "scans"

    def sens_path(self, scene: str) -> Path:
        return self.scans_dir() / scene / f"{scene}.sens"

    def scenes(self) -> list[str]:
        d = self.scans_dir()
        if not d.is_dir():
            raise ReaderError(f"{d}: not a folder (expected <root>/scans/<scene>/<scene>.sens)")
        found = sorted(p.name for p in d.iterdir() if (p / f"{p.name}.sens").is_file())
        split = self.entry.get("split", "all")
        if split == "all":
            return found
        wanted = read_split(self.root / f"scannetv2_{split}.txt")
        missing = sorted(set(wanted) - set(found))
        if missing and len(missing) == len(wanted):
            raise ReaderError(f"{self.root}: none of the {len(wanted)} scenes of split {split!r} has a .sens file")
        return [s for s in found if s in set(wanted)]

    def header(self, scene: str) -> SensHeader:
        path = self.sens_path(scene)
        try:
            with open(path, "rb") as f:
                return SensHeader(f, path)
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read: {exc}") from None

    def stored_size(self) -> tuple[int, int]:
        if self.entry.get("image_size"):
            h, w = self.entry["image_size"]
            return int(h), int(w)
        scenes = self.scenes()
        if not scenes:
            raise ReaderError(f"{self.scans_dir()}: no scenes")
        hd = self.header(scenes[0])
        return hd.depth_height, hd.depth_width

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        path = self.sens_path(scene)
        out_h, out_w = self.stored_size()
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read: {exc}") from None
        with f:
            hd = SensHeader(f, path)
            dh, dw = hd.depth_height, hd.depth_width
            k = hd.depth_intrinsics
            intr = scale_intrinsics(k[0, 0], k[1, 1], k[0, 2], k[1, 2], (dh, dw), (out_h, out_w))
            reduce = hd.color_width >= 2 * dw and hd.color_height >= 2 * dh
            depth_scale = 1000.0 / hd.depth_shift
            for i in range(hd.num_frames):
                head = f.read(_FRAME_HEAD.size)
                if len(head) != _FRAME_HEAD.size:
                    raise ReaderError(f"{path}: truncated at frame {i} of {hd.num_frames} (frame header)")
                pose_b, _, _, csize, dsize = _FRAME_HEAD.unpack(head)
                if i % frame_skip:
                    f.seek(csize + dsize, 1)
                    continue
                pose = np.frombuffer(pose_b, dtype="<f4").reshape(4, 4)
                if not np.isfinite(pose).all():
                    f.seek(csize + dsize, 1)
                    yield Skip(i, "nonfinite_pose")
                    continue
                cbytes, dbytes = f.read(csize), f.read(dsize)
                if len(cbytes) != csize or len(dbytes) != dsize:
                    raise ReaderError(f"{path}: truncated at frame {i} of {hd.num_frames} (image data)")
                try:
                    raw = zlib.decompress(dbytes)
                except zlib.error:
                    yield Skip(i, "corrupt_frame")
                    continue
                if len(raw) != dh * dw * 2:
                    raise ReaderError(f"{path}: frame {i} depth has {len(raw)} bytes, header says {dw}x{dh} uint16")
                depth = np.frombuffer(raw, dtype="<u2").reshape(dh, dw)
                if not depth.any():
                    yield Skip(i, "empty_depth")
                    continue
                bgr = cv2.imdecode(np.frombuffer(cbytes, np.uint8),
                                   cv2.IMREAD_REDUCED_COLOR_2 if reduce else cv2.IMREAD_COLOR)
                if bgr is None:
                    yield Skip(i, "corrupt_frame")
                    continue
                if depth_scale != 1.0:
                    depth = np.clip(np.rint(depth * depth_scale), 0, 65535).astype(np.uint16)
                if (dh, dw) != (out_h, out_w):
                    depth = cv2.resize(depth, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
                if bgr.shape[:2] != (out_h, out_w):
                    # INTER_AREA averages when shrinking (no aliasing); LINEAR when enlarging
                    shrink = bgr.shape[0] > out_h
                    bgr = cv2.resize(bgr, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield Frame(i, rgb, np.ascontiguousarray(depth), intr, pose.astype(np.float32))
