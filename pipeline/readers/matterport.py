"""Matterport3D undistorted perspective frames, one scene per house.

``<root>/<house>/undistorted_color_images/*.jpg``, ``undistorted_depth_images/*.png`` (uint16,
0.25 mm units: metres = d / 4000; stored as mm = round(d / 4)) and
``undistorted_camera_parameters/<house>.conf``. In the .conf, each
``intrinsics_matrix fx 0 cx 0 fy cy 0 0 1`` line applies to the ``scan`` lines after it; a
``scan <depth name> <colour name> <16 floats>`` line is one frame with its camera-to-world pose
(row-major) in the OpenGL camera convention (x right, y up, looking along -z):
pose_opencv = pose_gl @ diag(1, -1, -1, 1). source_index = the scan line's order in the .conf.
Splits: ``<root>/scenes_{train,val}.txt`` (house ids, one per line; Matterport's own files).

Principal point: Matterport's data organisation notes say every image of the .conf has its
origin at the bottom-left, so ``cy`` counts rows from the bottom. The store's row 0 is the top
of the stored image (OpenCV), so ``cy_opencv = H - 1 - cy`` (entry key ``cy_origin: bottom``,
the default). The evidence: the undistorted ``fx, fy, cx`` repeat the raw (top-left, OpenCV)
intrinsics of the same camera, while the raw ``cy`` equals 1023 - the .conf's ``cy`` on
1024-row images; Matterport's own GAPS code flips image rows on reading. Some public
preprocessing uses ``cy`` as is (``cy_origin: top`` does that); the two differ by
``|2 cy - (H - 1)|`` rows, a few to ~20 at 1024 rows. Not yet checked here by reprojecting a
depth image onto a house mesh (no Matterport data on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.pipeline.readers.base import BaseReader, Frame, ReaderError, Skip
from lift3d.pipeline.readers.common import (
    bgr_to_rgb,
    decode_image,
    entry_image_size,
    png_size,
    resize_depth,
    resize_rgb,
    scale_intrinsics,
    select_split,
    subfolders,
)

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
DEPTH_UNITS_PER_M = 4000.0


@dataclass
class Scan:
    depth_name: str
    color_name: str
    intrinsics: tuple[float, float, float, float]  # fx, fy, cx, cy
    pose_gl: np.ndarray


def parse_conf(path: Path) -> list[Scan]:
    """The scan lines of a Matterport ``<house>.conf``, each with the intrinsics in force."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read camera parameters: {exc.strerror or exc}") from None
    k = None
    scans = []
    for n, line in enumerate(lines, 1):
        w = line.split()
        if not w:
            continue
        try:
            if w[0] == "intrinsics_matrix":
                m = [float(x) for x in w[1:]]
                if len(m) != 9:
                    raise ValueError
                k = (m[0], m[4], m[2], m[5])
            elif w[0] == "scan":
                if len(w) != 19:
                    raise ValueError
                if k is None:
                    raise ReaderError(f"{path}:{n}: scan line before any intrinsics_matrix (missing intrinsics)")
                scans.append(Scan(w[1], w[2], k, np.array([float(x) for x in w[3:]]).reshape(4, 4)))
        except ValueError:
            raise ReaderError(f"{path}:{n}: malformed {w[0]} line") from None
    if not scans:
        raise ReaderError(f"{path}: no scan lines")
    return scans


class Reader(BaseReader):
    kind = "matterport"
    extra_keys = {"cy_origin": str}
    defaults = {"cy_origin": "bottom"}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        if self.root is None:
            raise ReaderError(f"dataset {entry.get('name')!r}: no root given")
        self.cy_origin = entry.get("cy_origin", "bottom")
        if self.cy_origin not in ("bottom", "top"):
            raise ReaderError(
                f"dataset {entry.get('name')!r}: cy_origin must be 'bottom' (Matterport's documented "
                f"image origin, the default) or 'top', got {self.cy_origin!r}"
            )
        self._size = None

    def conf_path(self, house: str) -> Path:
        return self.root / house / "undistorted_camera_parameters" / f"{house}.conf"

    def scenes(self) -> list[str]:
        if not self.root.is_dir():
            raise ReaderError(f"{self.root}: not a folder (expected <root>/<house>/undistorted_*)")
        found = sorted(p.name for p in subfolders(self.root) if self.conf_path(p.name).is_file())
        split = self.entry.get("split", "all")
        out = select_split(found, self.root, split, self.root / f"scenes_{split}.txt", "house")
        if not out:
            raise ReaderError(f"{self.root}: no houses (no <house>/undistorted_camera_parameters/<house>.conf)")
        return out

    def stored_size(self) -> tuple[int, int]:
        if self._size is None:
            size = entry_image_size(self.entry)
            if size is None:
                house = self.scenes()[0]
                first = parse_conf(self.conf_path(house))[0]
                size = png_size(self.root / house / "undistorted_depth_images" / first.depth_name)
            self._size = size
        return self._size

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        out_hw = self.stored_size()
        hdir = self.root / scene
        for i, s in enumerate(parse_conf(self.conf_path(scene))):
            if i % frame_skip:
                continue
            if not np.isfinite(s.pose_gl).all():
                yield Skip(i, "nonfinite_pose")
                continue
            dpath = hdir / "undistorted_depth_images" / s.depth_name
            raw = decode_image(dpath, cv2.IMREAD_UNCHANGED)
            if raw is None:
                yield Skip(i, "corrupt_frame")
                continue
            if raw.dtype != np.uint16 or raw.ndim != 2:
                raise ReaderError(f"{dpath}: depth must be a single-channel uint16 PNG, got {raw.dtype} {raw.shape}")
            if not raw.any():
                yield Skip(i, "empty_depth")
                continue
            cpath = hdir / "undistorted_color_images" / s.color_name
            bgr = decode_image(cpath, cv2.IMREAD_COLOR)
            if bgr is None:
                yield Skip(i, "corrupt_frame")
                continue
            if bgr.shape[:2] != raw.shape:
                raise ReaderError(
                    f"{dpath}: depth is {raw.shape[1]}x{raw.shape[0]} but colour {s.color_name} is "
                    f"{bgr.shape[1]}x{bgr.shape[0]}"
                )
            # 0.25 mm -> mm, rounding to nearest (integer arithmetic: (d + 2) // 4)
            depth = ((raw.astype(np.uint32) + 2) // 4).astype(np.uint16)
            fx, fy, cx, cy = s.intrinsics
            if self.cy_origin == "bottom":  # rows counted from the bottom -> from the top
                cy = raw.shape[0] - 1 - cy
            intr = scale_intrinsics(fx, fy, cx, cy, raw.shape, out_hw)
            pose = s.pose_gl @ GL_TO_CV
            yield Frame(
                i, resize_rgb(bgr_to_rgb(bgr), out_hw), resize_depth(depth, out_hw), intr, pose.astype(np.float32)
            )
