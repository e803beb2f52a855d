"""Matterport3D equirectangular RGB-D panoramas (stitched pairs, as the Data-Efficient 3D
Learner used; the official release has none).

``<root>/<house>/<name>_rgb.(png|jpg)`` with ``<name>_depth.(exr|png)``: depth is the distance
along the ray (not z); EXR holds metres (float), PNG holds uint16 in ``depth_scale`` units per
metre (default 4000, Matterport's 0.25 mm). An optional ``<name>_pose.txt`` (4x4
camera-to-world, OpenCV camera frame of the stores' (docs/stores.md) panorama convention) gives the pose,
identity otherwise. Frames are the pairs in name order (source_index = position). A panorama
must be W = 2H. Column c -> longitude u = pi - 2 pi (c + 0.5) / W, row r -> latitude
v = pi (r + 0.5) / H - pi / 2 (docs/stores.md); intrinsics are NaN, projection 1.
Splits: ``<root>/scenes_{train,val}.txt`` (house ids).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")  # read when OpenCV first meets an EXR

from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from lift3d.pipeline.readers.base import EQUIRECT, BaseReader, Frame, ReaderError, Skip  # noqa: E402
from lift3d.pipeline.readers.common import (  # noqa: E402
    bgr_to_rgb,
    entry_image_size,
    read_bytes,
    read_pose,
    resize_depth,
    resize_rgb,
    select_split,
    subfolders,
)

NAN4 = np.full(4, np.nan, np.float32)


def read_exr(path: Path) -> np.ndarray | None:
    """Single-channel float EXR (first channel if several); None if the bytes do not decode."""
    data = read_bytes(path)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if "OpenEXR" in str(exc) or "EXR" in str(exc):
            raise ReaderError(
                f"{path}: OpenCV cannot read EXR here ({str(exc).splitlines()[-1].strip()}); set "
                f"OPENCV_IO_ENABLE_OPENEXR=1 before anything imports cv2, or convert the depth "
                f"to 16-bit PNG with depth_scale"
            ) from None
        return None
    if img is not None and img.ndim == 3:
        img = img[..., -1] if img.shape[2] in (1, 2) else img[..., 0]
    return img


class Reader(BaseReader):
    kind = "matterport_pano"
    family = "matterport"  # the same scenes as kind matterport
    extra_keys = {"depth_scale": (int, float)}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        if self.root is None:
            raise ReaderError(f"dataset {entry.get('name')!r}: no root given")
        self.depth_scale = float(entry.get("depth_scale") or 4000.0)
        if not self.depth_scale > 0:
            raise ReaderError(f"dataset {entry.get('name')!r}: depth_scale must be positive")
        self._size = None

    def pairs(self, house: str) -> list[tuple[str, Path, Path]]:
        """(name, rgb path, depth path) sorted by name."""
        d = self.root / house
        out = []
        for rgb in sorted(list(d.glob("*_rgb.png")) + list(d.glob("*_rgb.jpg"))):
            name = rgb.name[: -len("_rgb.png")]
            depth = next((p for p in (d / f"{name}_depth.exr", d / f"{name}_depth.png") if p.is_file()), None)
            if depth is None:
                raise ReaderError(f"{rgb}: no matching {name}_depth.exr or {name}_depth.png")
            out.append((name, rgb, depth))
        names = [n for n, _, _ in out]
        if len(set(names)) != len(names):
            raise ReaderError(f"{d}: a panorama has both _rgb.png and _rgb.jpg")
        return sorted(out)

    def scenes(self) -> list[str]:
        if not self.root.is_dir():
            raise ReaderError(f"{self.root}: not a folder (expected <root>/<house>/<name>_rgb.png ...)")
        found = sorted(p.name for p in subfolders(self.root) if (any(p.glob("*_rgb.png")) or any(p.glob("*_rgb.jpg"))))
        split = self.entry.get("split", "all")
        out = select_split(found, self.root, split, self.root / f"scenes_{split}.txt", "house")
        if not out:
            raise ReaderError(f"{self.root}: no houses with *_rgb.png / *_rgb.jpg panoramas")
        return out

    def stored_size(self) -> tuple[int, int]:
        if self._size is None:
            size = entry_image_size(self.entry)
            where = f"dataset {self.entry.get('name')!r}: image_size"
            if size is None:
                pairs = self.pairs(self.scenes()[0])
                if not pairs:
                    raise ReaderError(f"{self.root / self.scenes()[0]}: no panoramas")
                img = cv2.imdecode(np.frombuffer(read_bytes(pairs[0][1]), np.uint8), cv2.IMREAD_COLOR)
                if img is None:
                    raise ReaderError(f"{pairs[0][1]}: cannot decode the first panorama (to find the stored size)")
                size = img.shape[:2]
                where = f"{pairs[0][1]} (the first panorama, which sets the stored size)"
            if size[1] != 2 * size[0]:
                raise ReaderError(
                    f"{where}: stored panorama size {size[1]}x{size[0]} must have W = 2H (wrong aspect ratio)"
                )
            self._size = tuple(int(x) for x in size)
        return self._size

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        out_hw = self.stored_size()
        for i, (name, rgb_p, depth_p) in enumerate(self.pairs(scene)):
            if i % frame_skip:
                continue
            pose_p = rgb_p.with_name(f"{name}_pose.txt")
            pose = read_pose(pose_p) if pose_p.is_file() else np.eye(4)
            if not np.isfinite(pose).all():
                yield Skip(i, "nonfinite_pose")
                continue
            bgr = cv2.imdecode(np.frombuffer(read_bytes(rgb_p), np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                yield Skip(i, "corrupt_frame")
                continue
            h, w = bgr.shape[:2]
            if w != 2 * h:
                raise ReaderError(
                    f"{rgb_p}: panorama is {w}x{h}; an equirectangular panorama has W = 2H (wrong aspect ratio)"
                )
            if depth_p.suffix == ".exr":
                d = read_exr(depth_p)
                if d is None:
                    yield Skip(i, "corrupt_frame")
                    continue
                d = np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float64)
                depth = np.clip(np.rint(d * 1000.0), 0, 65535).astype(np.uint16)
            else:
                raw = cv2.imdecode(np.frombuffer(read_bytes(depth_p), np.uint8), cv2.IMREAD_UNCHANGED)
                if raw is None:
                    yield Skip(i, "corrupt_frame")
                    continue
                if raw.dtype != np.uint16 or raw.ndim != 2:
                    raise ReaderError(
                        f"{depth_p}: depth PNG must be single-channel uint16, got {raw.dtype} {raw.shape}"
                    )
                depth = (
                    raw
                    if self.depth_scale == 1000.0
                    else np.clip(np.rint(raw * (1000.0 / self.depth_scale)), 0, 65535).astype(np.uint16)
                )
            if depth.shape != (h, w):
                raise ReaderError(
                    f"{depth_p}: depth is {depth.shape[1]}x{depth.shape[0]}, panorama {rgb_p.name} is {w}x{h}"
                )
            if not depth.any():
                yield Skip(i, "empty_depth")
                continue
            yield Frame(
                i,
                resize_rgb(bgr_to_rgb(bgr), out_hw),
                resize_depth(depth, out_hw),
                NAN4.copy(),
                pose.astype(np.float32),
                projection=EQUIRECT,
            )
