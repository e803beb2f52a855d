"""ScanNet raw scans: ``<root>/scans/<scene>/<scene>.sens`` read directly (no export step).

The container layout is in ``pipeline/sens_format.py``. Colour (1296x968 in ScanNet) is
brought onto the depth grid (640x480) and the *depth* intrinsics are used: the JPEG is decoded
at 1/2 (or 1/4) size by libjpeg when it is at least ~2x (4x) the stored size, then one
bilinear ``warpAffine`` maps it through the colour intrinsics onto the stored grid (the colour
and depth cameras of ScanNet differ slightly in focal length and principal point; the map
pixel -> ray (stored K) -> colour pixel (colour K) is affine). ``color_align: resize`` uses a
plain resize instead. Frames that are not kept are never decoded: the reader seeks past them.

2D labels (``labels_2d()``): ``label-filt/<frame>.png`` from ``scans/<scene>/label-filt/`` or
``scans/<scene>/<scene>_2d-label-filt.zip``, at the colour size (``pipeline/readers/scannet_labels.py``).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.pipeline.readers.base import BaseReader, Frame, LabelSource, ReaderError, Skip
from lift3d.pipeline.readers.common import (
    entry_image_size,
    read_split,
    resize_depth,
    scale_intrinsics,
    select_split,
    shrink_interpolation,
    subfolders,
)
from lift3d.pipeline.readers.scannet_labels import ScanNetLabels
from lift3d.pipeline.readers.scannet_sens import (
    COLOR_JPEG,
    COLOR_PNG,
    COLOR_RAW,
    DEPTH_RAW,
    DEPTH_ZLIB,
    SensHeader,
    iter_frames,
    read_header,
)

__all__ = ["Reader", "SensHeader", "scale_intrinsics", "read_split", "color_warp"]


def _k(m: np.ndarray) -> tuple[float, float, float, float]:
    return float(m[0, 0]), float(m[1, 1]), float(m[0, 2]), float(m[1, 2])


def _valid_k(k) -> bool:
    return bool(np.isfinite(k).all() and k[0] > 0 and k[1] > 0)


def color_warp(color_k, stored_k, reduce: int) -> np.ndarray:
    """2x3 affine map: stored pixel (x, y) -> pixel of the colour image decoded at 1/reduce size.

    x_c = fx_c (x - cx_s) / fx_s + cx_c in full colour pixels; a 1/s decode's pixel i covers full
    pixels s i .. s i + s - 1, so x_r = (x_c + 0.5) / s - 0.5 (same for y).
    """
    fxc, fyc, cxc, cyc = color_k
    fxs, fys, cxs, cys = stored_k
    ax, ay = fxc / fxs, fyc / fys
    bx, by = cxc - ax * cxs, cyc - ay * cys
    s = float(reduce)
    return np.array([[ax / s, 0.0, (bx + 0.5) / s - 0.5], [0.0, ay / s, (by + 0.5) / s - 0.5]], np.float64)


class Reader(BaseReader):
    kind = "scannet"
    extra_keys = {"color_align": str}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        self._size: tuple[int, int] | None = None
        self.color_align = entry.get("color_align") or "intrinsics"
        if self.color_align not in ("intrinsics", "resize"):
            raise ReaderError(
                f"dataset {entry.get('name')!r}: color_align must be 'intrinsics' or 'resize', got {self.color_align!r}"
            )

    def scans_dir(self) -> Path:
        if self.root is None:
            raise ReaderError(f"dataset {self.entry.get('name')!r}: no root given")
        return self.root / "scans"

    def sens_path(self, scene: str) -> Path:
        return self.scans_dir() / scene / f"{scene}.sens"

    def scenes(self) -> list[str]:
        d = self.scans_dir()
        if not d.is_dir():
            raise ReaderError(f"{d}: not a folder (expected <root>/scans/<scene>/<scene>.sens)")
        found = sorted(p.name for p in subfolders(d) if (p / f"{p.name}.sens").is_file())
        split = self.entry.get("split", "all")
        out = select_split(found, d, split, self.root / f"scannetv2_{split}.txt")
        if not out:
            raise ReaderError(f"{d}: no scenes (no <scene>/<scene>.sens found for split {split!r})")
        return out

    def header(self, scene: str) -> SensHeader:
        path = self.sens_path(scene)
        try:
            with open(path, "rb") as f:
                return read_header(f, path)
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None

    def stored_size(self) -> tuple[int, int]:
        if self._size is None:
            size = entry_image_size(self.entry)
            if size is None:
                hd = self.header(self.scenes()[0])
                size = (hd.depth_height, hd.depth_width)
            self._size = size
        return self._size

    def labels_2d(self) -> LabelSource | None:
        """``label-filt/<frame>.png`` (ScanNet ids, through the tsv and NYU40) per frame, from
        ``scans/<scene>/label-filt/`` or ``scans/<scene>/<scene>_2d-label-filt.zip``; None without
        ``<root>/scans``."""
        if self.root is None or not (self.root / "scans").is_dir():
            return None
        return ScanNetLabels(self.root)

    def _check(self, hd: SensHeader, path: Path) -> None:
        if hd.color_compression not in (COLOR_RAW, COLOR_PNG, COLOR_JPEG):
            raise ReaderError(f"{path}: colour compression {hd.color_compression} is not raw (0), PNG (1) or JPEG (2)")
        if hd.depth_compression not in (DEPTH_RAW, DEPTH_ZLIB):
            raise ReaderError(f"{path}: depth compression {hd.depth_compression} is not raw (0) or zlib (1)")
        if not (hd.depth_width and hd.depth_height and hd.color_width and hd.color_height):
            raise ReaderError(f"{path}: zero image size in header")
        if not hd.depth_shift > 0:
            raise ReaderError(f"{path}: depth shift {hd.depth_shift} must be positive")
        if not _valid_k(np.array(_k(hd.depth_intrinsics))):
            raise ReaderError(f"{path}: missing or invalid depth intrinsics {_k(hd.depth_intrinsics)}")
        if self.color_align == "intrinsics" and not _valid_k(np.array(_k(hd.color_intrinsics))):
            raise ReaderError(
                f"{path}: missing or invalid colour intrinsics {_k(hd.color_intrinsics)} "
                f"(set color_align: resize to align colour by a plain resize)"
            )

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        path = self.sens_path(scene)
        out_h, out_w = self.stored_size()
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None
        with f:
            hd = read_header(f, path)
            self._check(hd, path)
            dh, dw, ch, cw = hd.depth_height, hd.depth_width, hd.color_height, hd.color_width
            intr = scale_intrinsics(*_k(hd.depth_intrinsics), (dh, dw), (out_h, out_w))
            # libjpeg's scaled decode (1/2, 1/4) when the colour is at least ~2x / ~4x the stored size
            ratio = min(cw / out_w, ch / out_h)
            reduce = 4 if ratio >= 3.8 else 2 if ratio >= 1.9 else 1
            if hd.color_compression != COLOR_JPEG:
                reduce = 1
            flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[reduce]
            dec_hw = (-(-ch // reduce), -(-cw // reduce))
            warp = color_warp(_k(hd.color_intrinsics), intr, reduce) if self.color_align == "intrinsics" else None
            resize_interp = shrink_interpolation(dec_hw, (out_h, out_w))
            # a bilinear warp would alias when still shrinking > 1.5x: INTER_AREA to ~the stored size first
            pre_hw = None
            if warp is not None and resize_interp == cv2.INTER_AREA:
                pre_hw = (out_h, out_w)
                sy, sx = pre_hw[0] / dec_hw[0], pre_hw[1] / dec_hw[1]
                warp = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]]) @ np.vstack([warp, [0, 0, 1]])
            depth_scale = 1000.0 / hd.depth_shift
            n_depth = dh * dw * 2
            for i, pose, cb, db in iter_frames(f, path, hd, lambda j: j % frame_skip == 0):
                if cb is None:
                    yield Skip(i, "nonfinite_pose")
                    continue
                if hd.depth_compression == DEPTH_ZLIB:
                    try:
                        raw = zlib.decompress(db)
                    except zlib.error:
                        yield Skip(i, "corrupt_frame")
                        continue
                else:
                    raw = db
                if len(raw) != n_depth:
                    raise ReaderError(
                        f"{path}: frame {i} depth has {len(raw)} bytes, header says {dw}x{dh} uint16 ({n_depth} bytes)"
                    )
                depth = np.frombuffer(raw, dtype="<u2").reshape(dh, dw)
                if not depth.any():
                    yield Skip(i, "empty_depth")
                    continue
                if hd.color_compression == COLOR_RAW:
                    if len(cb) != ch * cw * 3:
                        raise ReaderError(f"{path}: frame {i} raw colour has {len(cb)} bytes, header says {cw}x{ch}x3")
                    bgr = np.frombuffer(cb, np.uint8).reshape(ch, cw, 3)[..., ::-1]
                else:
                    bgr = cv2.imdecode(np.frombuffer(cb, np.uint8), flag)
                    if bgr is None:
                        yield Skip(i, "corrupt_frame")
                        continue
                    if bgr.shape[:2] != dec_hw:
                        raise ReaderError(
                            f"{path}: frame {i} colour image is {bgr.shape[1] * reduce}x"
                            f"{bgr.shape[0] * reduce}, header says {cw}x{ch}"
                        )
                if depth_scale != 1.0:
                    depth = np.clip(np.rint(depth * depth_scale), 0, 65535).astype(np.uint16)
                depth = resize_depth(depth, (out_h, out_w))
                if pre_hw is not None:
                    bgr = cv2.resize(bgr, (pre_hw[1], pre_hw[0]), interpolation=cv2.INTER_AREA)
                if warp is not None:
                    bgr = cv2.warpAffine(
                        bgr,
                        warp,
                        (out_w, out_h),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE,
                    )
                elif bgr.shape[:2] != (out_h, out_w):
                    bgr = cv2.resize(bgr, (out_w, out_h), interpolation=resize_interp)
                rgb = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2RGB)
                yield Frame(i, rgb, np.ascontiguousarray(depth), intr, pose.astype(np.float32))
