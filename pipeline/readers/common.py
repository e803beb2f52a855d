"""Small helpers the dataset readers share: intrinsics scaling, split files, image and text I/O."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from lift3d.pipeline.readers.base import ReaderError


def scale_intrinsics(fx: float, fy: float, cx: float, cy: float, src_hw, dst_hw) -> np.ndarray:
    """Intrinsics after a resize src -> dst, integer coordinates at pixel centres.

    f' = f * s and c' = (c + 0.5) * s - 0.5 per axis, with s = dst / src.
    """
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return np.array([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], np.float32)


def read_split(path: Path, split: str | None = None, hint: str = "use split: all or add the file") -> list[str]:
    """Sorted unique ids of a split file (one id per line; blank lines and # comments ignored)."""
    path = Path(path)
    if not path.is_file():
        what = f" (needed for split={split!r})" if split else ""
        raise ReaderError(f"split file {path} not found{what}; {hint}")
    ids = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.add(line)
    return sorted(ids)


def select_split(found: list[str], root: Path, split: str, path: Path, what: str = "scene") -> list[str]:
    """``found`` restricted to a split file's ids; an id listed but absent on disk is an error."""
    if split == "all":
        return sorted(found)
    wanted = read_split(path, split)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ReaderError(
            f"{path}: {len(missing)} of the {len(wanted)} {what}s of split {split!r} are not under "
            f"{root} (first: {', '.join(missing[:3])})"
        )
    return wanted


IGNORED_DIRS = ("lost+found",)  # a file system's own folder at a mount point, never a scene


def subfolders(root: Path) -> list[Path]:
    """The folders directly under ``root``, sorted. A folder that cannot be listed is an error
    naming it: a scene left out because of its permissions would be lost without a word."""
    try:
        found = sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name not in IGNORED_DIRS)
    except OSError as exc:
        raise ReaderError(f"{root}: cannot list the folder: {exc.strerror or exc}") from None
    for p in found:
        readable_folder(p)
    return found


def readable_folder(path: Path) -> None:
    """ReaderError naming ``path`` when its entries cannot be listed (e.g. permission denied)."""
    try:
        os.listdir(path)
    except OSError as exc:
        raise ReaderError(f"{path}: unreadable folder: {exc.strerror or exc}") from None


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None


def decode_image(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """cv2.imdecode of a file; None when the bytes are not a decodable image; missing file -> error."""
    data = read_bytes(path)
    if not data:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def read_matrix(path: Path, shape: tuple[int, int] | None = None, what: str = "matrix") -> np.ndarray:
    """A whitespace-separated float matrix from a text file, checked against ``shape``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        rows = [[float(x) for x in line.replace(",", " ").split()] for line in text.splitlines() if line.strip()]
        m = np.array(rows, np.float64)
    except ValueError:
        raise ReaderError(f"{path}: {what} is not a matrix of numbers") from None
    if shape is not None and m.shape != tuple(shape):
        raise ReaderError(f"{path}: {what} has shape {m.shape}, expected {tuple(shape)}")
    return m


def shrink_interpolation(src_hw, dst_hw) -> int:
    """INTER_AREA when shrinking by more than 1.5x (anti-aliasing), else INTER_LINEAR (cheap)."""
    s = max(src_hw[0] / dst_hw[0], src_hw[1] / dst_hw[1])
    return cv2.INTER_AREA if s > 1.5 else cv2.INTER_LINEAR


def resize_rgb(img: np.ndarray, dst_hw) -> np.ndarray:
    if img.shape[:2] == tuple(dst_hw):
        return img
    return cv2.resize(img, (dst_hw[1], dst_hw[0]), interpolation=shrink_interpolation(img.shape[:2], dst_hw))


def resize_depth(depth: np.ndarray, dst_hw) -> np.ndarray:
    """Nearest neighbour about pixel centres: depth is never interpolated across edges."""
    if depth.shape[:2] == tuple(dst_hw):
        return depth
    (h, w), (dh, dw) = depth.shape[:2], dst_hw
    # stored pixel j takes source pixel floor((j + 0.5) * src / dst): the one under its centre
    rows = np.minimum(((np.arange(dh) + 0.5) * h / dh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(dw) + 0.5) * w / dw).astype(np.int64), w - 1)
    return np.ascontiguousarray(depth[rows[:, None], cols[None, :]])


def bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 RGB from a decoded BGR / BGRA / grey image (16-bit colour is scaled to 8 bits)."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def entry_image_size(entry: dict) -> tuple[int, int] | None:
    s = entry.get("image_size")
    if not s:
        return None
    if len(s) != 2 or int(s[0]) <= 0 or int(s[1]) <= 0:
        raise ReaderError(f"dataset {entry.get('name')!r}: image_size must be [H, W] with positive values, got {s}")
    return int(s[0]), int(s[1])


def png_size(path: Path) -> tuple[int, int]:
    """(H, W) from a PNG's IHDR chunk, without decoding the image."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ReaderError(f"{path}: not a PNG file")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return h, w


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic), which carry the size
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def encoded_image_hw(data: bytes) -> tuple[int, int]:
    """(H, W) from a JPEG SOF or PNG IHDR header in ``data`` (the file's first bytes suffice);
    (0, 0) when not found there."""
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] != b"\xff\xd8":
        return 0, 0
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        if marker in (0xFF, 0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return 0, 0


def image_hw(path: Path, head: int = 1 << 16) -> tuple[int, int]:
    """(H, W) of a JPEG or PNG file from its header (its first ``head`` bytes, else the whole file),
    decoded only as a last resort; ReaderError naming the file when it is missing or not an image."""
    try:
        with open(path, "rb") as f:
            data = f.read(head)
            hw = encoded_image_hw(data)
            if hw == (0, 0) and len(data) == head:
                data += f.read()
                hw = encoded_image_hw(data)
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if hw == (0, 0):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if img is None:
            raise ReaderError(f"{path}: not a readable image (no JPEG or PNG header)")
        hw = img.shape[:2]
    return int(hw[0]), int(hw[1])


def decode_label_png(data: bytes, where: str) -> np.ndarray:
    """A label image: a single-channel 8- or 16-bit PNG, decoded as is (uint8 / uint16 (H, W));
    ReaderError naming ``where`` otherwise."""
    if data[:8] != PNG_SIGNATURE:
        raise ReaderError(f"{where}: not a PNG file (label images are single-channel 8- or 16-bit PNGs)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ReaderError(f"{where}: unreadable PNG (corrupt or truncated)")
    if img.ndim != 2:
        raise ReaderError(f"{where}: label image has {img.shape[2]} channels, expected a single-channel PNG of ids")
    if img.dtype not in (np.uint8, np.uint16):
        raise ReaderError(f"{where}: label image is {img.dtype}, expected 8- or 16-bit integer ids")
    return img


def check_label_size(label_hw, colour_hw, where: str, colour: str) -> None:
    """ReaderError naming the label file ``where`` when its (H, W) differs from the frame's colour
    image (``colour`` says which file or header gave that size)."""
    if tuple(label_hw) != tuple(colour_hw):
        raise ReaderError(
            f"{where}: label image is {label_hw[1]}x{label_hw[0]} but the frame's colour image is "
            f"{colour_hw[1]}x{colour_hw[0]} ({colour}); a label image must have its colour image's size"
        )


def read_pose(path: Path) -> np.ndarray:
    """A 4x4 pose from a text file (ScanNet export / Matterport style); may be non-finite."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read pose: {exc.strerror or exc}") from None
    try:
        vals = [float(x) for x in text.split()]
    except ValueError:
        raise ReaderError(f"{path}: pose is not 16 numbers") from None
    if len(vals) != 16:
        raise ReaderError(f"{path}: pose has {len(vals)} numbers, expected 16 (4x4)")
    return np.array(vals, np.float64).reshape(4, 4)


def nearest_index(n_dst: int, n_src: int) -> np.ndarray:
    """For each destination pixel 0..n_dst-1, the source cell whose area holds its centre when
    both grids span the same extent (align_corners = False): floor((d + 0.5) n_src / n_dst)."""
    d = np.arange(n_dst, dtype=np.float64)
    return np.minimum(np.floor((d + 0.5) * n_src / n_dst).astype(np.int64), n_src - 1)


def to_grid(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resample a 2D map to h x w with :func:`nearest_index` along both axes."""
    return img[nearest_index(h, img.shape[0])[:, None], nearest_index(w, img.shape[1])[None, :]]
