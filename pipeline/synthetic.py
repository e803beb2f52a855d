"""The embedded default dataset: procedural indoor rooms written in ScanNet's raw format.

``generate(out, scenes, seed)`` builds rooms (floor, walls, optional ceiling, wall-mounted
doors / windows / pictures / curtains, furniture made of boxes and vertical cylinders, each
NYU40 class with its own procedural texture), renders a camera trajectory per room by exact
ray casting (numpy, vectorised; each primitive only tests the rays inside its projected
bounding rectangle), and writes, under ``out/``:

- ``scans/<scene>/<scene>.sens`` (version 4; JPEG colour at twice the depth resolution with
  its own intrinsics, zlib uint16 depth in mm, depth shift 1000, camera-to-world poses; frames
  ``i % 40 == 20`` have a -inf pose and odd scenes have one all-zero depth frame, as real
  ScanNet does, so the skip paths run),
- ``scans/<scene>/<scene>_vh_clean_2.ply`` and ``<scene>_vh_clean_2.labels.ply`` (binary PLY;
  vertex colours; ``label`` = NYU40 id), in the ``.sens`` pose frame (world z up),
- ``scans/<scene>/<scene>_2d-label-filt.zip``: ``label-filt/<frame>.png``, 16-bit ScanNet
  label ids at colour resolution; ``scannetv2-labels.combined.tsv`` maps them to NYU40,
- ``scannetv2_train.txt`` / ``scannetv2_val.txt``.

Lighting is Lambertian from a point light (view independent), so the mesh's vertex colours
and the images agree. A ``kind: synthetic`` dataset generates into ``<workdir>/raw/<name>``
once and is read by the unchanged ScanNet reader, so the demo runs the real ScanNet path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline import scannet
from pipeline.reader_common import entry_image_size
from pipeline.readers import ReaderError
from pipeline.sens_format import intrinsics44
from pipeline.sens_format import write_sens as _write_sens

# key: (ScanNet label id, raw category, NYU40 id, NYU40 class). Several raw categories map to one
# NYU40 class (chair / office chair, table / coffee table) as in ScanNet's table.
CLASSES = {
    "wall": (1, "wall", 1, "wall"), "chair": (2, "chair", 5, "chair"), "floor": (3, "floor", 2, "floor"),
    "table": (4, "table", 7, "table"), "door": (5, "door", 8, "door"), "couch": (6, "couch", 6, "sofa"),
    "cabinet": (7, "cabinet", 3, "cabinet"), "desk": (9, "desk", 14, "desk"),
    "office chair": (10, "office chair", 5, "chair"), "bed": (11, "bed", 4, "bed"),
    "bookshelf": (13, "bookshelf", 10, "bookshelf"), "picture": (14, "picture", 11, "picture"),
    "window": (15, "window", 9, "window"), "curtain": (19, "curtain", 16, "curtain"),
    "coffee table": (22, "coffee table", 7, "table"), "refrigerator": (24, "refrigerator", 24, "refridgerator"),
    "trash can": (25, "trash can", 39, "otherfurniture"), "ceiling": (41, "ceiling", 22, "ceiling"),
}
KEYS = list(CLASSES)
KEY_INDEX = {k: i for i, k in enumerate(KEYS)}
SCANNET_ID = np.array([CLASSES[k][0] for k in KEYS] + [0], np.uint16)   # last entry: no hit
NYU40_ID = np.array([CLASSES[k][2] for k in KEYS] + [0], np.uint16)
TSV_COLUMNS = ["id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
               "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
               "wnsynsetkey", "mpcat40", "mpcat40index"]

DEFAULTS = {"depth_size": [120, 160], "frames_per_scene": 60, "jpeg_quality": 92, "mesh_spacing": 0.05}
VERSION = 2           # bump when the generator's output changes (invalidates prepared copies)
LOST_TRACKING = (40, 20)   # frames with i % 40 == 20 get a -inf pose
MAX_RANGE_M = 10.0
GRAZING_COS = 0.06    # depth sensors return nothing at grazing incidence


# ----------------------------------------------------------------------------- textures

def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic integer hash of lattice points -> [0, 1]."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + (seed % 1000003) * 1442695041)
    h &= 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 0xFFFF) / 65535.0


def value_noise(u: np.ndarray, v: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with feature size ``scale`` (metres)."""
    x, y = u / scale, v / scale
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash01(ix, iy, seed), _hash01(ix + 1, iy, seed)
    c, d = _hash01(ix, iy + 1, seed), _hash01(ix + 1, iy + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _mix(mask: np.ndarray, a, b) -> np.ndarray:
    m = mask.astype(np.float64)[:, None]
    return m * np.asarray(b, np.float64) + (1 - m) * np.asarray(a, np.float64)


def texture(key: str, u: np.ndarray, v: np.ndarray, su: np.ndarray, sv: np.ndarray, vertical: np.ndarray,
            seed: int, tint: np.ndarray) -> np.ndarray:
    """Albedo (M, 3) in [0, 1] for class ``key`` at surface coordinates u, v (metres; v is up on
    vertical faces) and face-normalised su, sv in [0, 1]. ``tint``: the object's colour jitter."""
    n_fine = value_noise(u, v, 0.02, seed + 7)
    if key == "wall":        # painted plaster: large soft blotches
        base = tint * (0.9 + 0.1 * value_noise(u, v, 0.6, seed))[:, None]
    elif key == "floor":     # wooden planks along u
        plank = np.floor(v / 0.18)
        shade = _hash01(plank, plank * 0 + 3, seed)
        grain = 0.5 + 0.5 * np.sin(u * 25 + 6 * value_noise(u, v, 0.3, seed + 1) + plank * 2.3)
        base = np.array([0.55, 0.35, 0.18]) * (0.8 + 0.25 * shade)[:, None] + 0.08 * grain[:, None]
        base = _mix(np.mod(v, 0.18) < 0.008, base, [0.2, 0.12, 0.06])
    elif key == "ceiling":
        base = np.array([0.93, 0.93, 0.9]) * (0.97 + 0.03 * n_fine)[:, None]
    elif key == "bed":       # blue and white stripes
        base = _mix(np.mod(u, 0.16) < 0.08, [0.12, 0.22, 0.65], [0.92, 0.92, 0.96])
    elif key == "chair":     # red cloth with a fine checker weave
        c = (np.floor(u / 0.025) + np.floor(v / 0.025)) % 2
        base = _mix(c > 0, [0.75, 0.1, 0.08], [0.55, 0.05, 0.05])
    elif key == "office chair":  # black mesh with diagonal lines
        d = np.mod(u + v, 0.04) < 0.012
        base = _mix(d, [0.1, 0.1, 0.12], [0.35, 0.35, 0.4])
    elif key == "couch":     # green velvet
        base = np.array([0.12, 0.5, 0.2]) * (0.7 + 0.5 * value_noise(u, v, 0.08, seed))[:, None]
    elif key in ("table", "coffee table"):  # wood with rings
        r = np.hypot((su - 0.5) * 3.0, (sv - 0.5) * 0.7) * 30 + 3 * value_noise(u, v, 0.2, seed)
        wood = np.array([0.78, 0.56, 0.3]) if key == "table" else np.array([0.35, 0.2, 0.1])
        base = wood * (0.82 + 0.18 * np.sin(r))[:, None]
    elif key == "cabinet":   # dark wood, vertical grain, door seams and handles
        grain = np.sin(u * 60 + 8 * value_noise(u, v, 0.25, seed))
        base = np.array([0.32, 0.18, 0.1]) * (0.85 + 0.15 * grain)[:, None]
        base = _mix(np.mod(u, 0.45) < 0.012, base, [0.1, 0.06, 0.03])
        handle = (np.abs(np.mod(u, 0.45) - 0.38) < 0.015) & (np.abs(v - 0.7) < 0.08)
        base = _mix(handle & vertical, base, [0.85, 0.85, 0.8])
    elif key == "bookshelf":  # colourful book spines in shelves
        k = np.floor(u / 0.035)
        shelf = np.floor(v / 0.33)
        hue = _hash01(k, shelf, seed) * 6.283
        spines = np.stack([0.5 + 0.4 * np.sin(hue), 0.5 + 0.4 * np.sin(hue + 2.1), 0.5 + 0.4 * np.sin(hue + 4.2)], 1)
        base = _mix((np.mod(v, 0.33) < 0.03) | ~vertical, spines, [0.45, 0.3, 0.15])
    elif key == "picture":   # a colourful painting in a black frame
        p = np.sin(su * 9 + seed) + np.sin(sv * 7 + 2 * np.sin(su * 5)) + np.sin((su + sv) * 6)
        art = np.stack([0.5 + 0.45 * np.sin(p * 1.7), 0.5 + 0.45 * np.sin(p * 1.7 + 2), 0.5 + 0.45 * np.sin(p * 1.7 + 4)], 1)
        frame = (su < 0.06) | (su > 0.94) | (sv < 0.06) | (sv > 0.94)
        base = _mix(frame, art, [0.05, 0.05, 0.05])
    elif key == "window":    # sky gradient with white mullions
        sky = np.stack([0.55 + 0.3 * sv, 0.75 + 0.2 * sv, 0.98 + 0 * sv], 1)
        bars = (np.abs(su - 0.5) < 0.025) | (np.abs(sv - 0.55) < 0.025) | (su < 0.04) | (su > 0.96) | \
               (sv < 0.05) | (sv > 0.95)
        base = _mix(bars, sky, [0.95, 0.95, 0.95])
    elif key == "door":      # brown with four recessed panels
        pu, pv = np.mod(su * 2, 1.0), np.mod(sv * 2, 1.0)
        groove = ((np.abs(pu - 0.15) < 0.03) | (np.abs(pu - 0.85) < 0.03)) & (pv > 0.12) & (pv < 0.88) | \
                 ((np.abs(pv - 0.12) < 0.02) | (np.abs(pv - 0.88) < 0.02)) & (pu > 0.15) & (pu < 0.85)
        base = _mix(groove, [0.55, 0.33, 0.17], [0.28, 0.16, 0.08])
        knob = np.hypot((su - 0.88) * 0.9, (sv - 0.47) * 2.05) < 0.035
        base = _mix(knob & vertical, base, [0.85, 0.75, 0.3])
    elif key == "desk":      # grey laminate with speckle
        base = np.array([0.55, 0.56, 0.58]) * (0.85 + 0.3 * (n_fine > 0.8))[:, None]
    elif key == "curtain":   # purple folds
        base = np.array([0.45, 0.15, 0.55]) * (0.65 + 0.35 * np.sin(u * 40) ** 2)[:, None]
    elif key == "refrigerator":  # brushed white with a handle line
        base = np.array([0.9, 0.9, 0.92]) * (0.93 + 0.07 * value_noise(u * 40, v, 0.5, seed))[:, None]
        base = _mix((np.abs(su - 0.9) < 0.015) & vertical & (sv > 0.3), base, [0.3, 0.3, 0.32])
    elif key == "trash can":  # orange with white dots
        dots = np.hypot(np.mod(u, 0.08) - 0.04, np.mod(v, 0.08) - 0.04) < 0.015
        base = _mix(dots, [0.95, 0.5, 0.1], [0.97, 0.97, 0.97])
    else:
        raise KeyError(key)
    if key != "wall":  # per-object brightness jitter
        base = base * (0.92 + 0.16 * (tint.mean() - 0.5))
    return np.clip(base + 0.05 * (n_fine - 0.5)[:, None], 0, 1)


# ----------------------------------------------------------------------------- primitives

@dataclass
class Prim:
    """A box (``half`` extents, rotated by ``yaw`` about z) or a vertical cylinder (``radius``)."""
    key: str
    center: np.ndarray
    half: np.ndarray
    yaw: float = 0.0
    radius: float = 0.0           # > 0: cylinder of this radius, z extent from ``half[2]``
    seed: int = 0
    tint: np.ndarray = field(default_factory=lambda: np.full(3, 0.5))

    @property
    def is_cyl(self) -> bool:
        return self.radius > 0

    def rot(self) -> np.ndarray:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])

    def corners(self) -> np.ndarray:
        h = self.half if not self.is_cyl else np.array([self.radius, self.radius, self.half[2]])
        sgn = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
        return (sgn * h) @ self.rot().T + self.center

    def intersect(self, o: np.ndarray, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray):
        """(t, face) per ray (direction components dx, dy, dz, any shape); t = inf where missed.
        Box faces 2*axis + (positive side); cylinder faces 0 side, 1 top, 2 bottom."""
        r = self.rot()
        ol = r.T @ (o - self.center)
        # world -> local (a yaw about z): local = r^T d
        lx, ly, lz = r[0, 0] * dx + r[1, 0] * dy, r[0, 1] * dx + r[1, 1] * dy, dz
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if not self.is_cyl:
                lo_hi = []
                for a, da in enumerate((lx, ly, lz)):
                    t1 = (-self.half[a] - ol[a]) / da
                    t2 = (self.half[a] - ol[a]) / da
                    lo_hi.append((np.minimum(t1, t2), np.maximum(t1, t2)))
                (n0, f0), (n1, f1), (n2, f2) = lo_hi
                tn = np.maximum(np.maximum(n0, n1), n2)
                tf = np.minimum(np.minimum(f0, f1), f2)
                axis = np.where(n0 >= n1, np.where(n0 >= n2, 0, 2), np.where(n1 >= n2, 1, 2))
                neg = np.where(axis == 0, lx, np.where(axis == 1, ly, lz)) < 0
                hit = (tn <= tf) & (tn > 1e-6)
                return np.where(hit, tn, np.inf), 2 * axis + neg
            rr, hz = self.radius, self.half[2]
            a = lx * lx + ly * ly
            b = 2 * (ol[0] * lx + ol[1] * ly)
            c = ol[0] ** 2 + ol[1] ** 2 - rr * rr
            disc = b * b - 4 * a * c
            ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
            zs = ol[2] + ts * lz
            best = np.where((disc >= 0) & (a > 0) & (ts > 1e-6) & (np.abs(zs) <= hz), ts, np.inf)
            face = np.zeros(best.shape, np.int64)
            for f, zc in ((1, hz), (2, -hz)):
                tc = (zc - ol[2]) / lz
                xc, yc = ol[0] + tc * lx, ol[1] + tc * ly
                tc = np.where((tc > 1e-6) & (xc * xc + yc * yc <= rr * rr), tc, np.inf)
                better = tc < best
                best, face = np.where(better, tc, best), np.where(better, f, face)
            return best, face

    def surface(self, face: np.ndarray, p: np.ndarray):
        """(u, v, su, sv, normal) at world points p on the given faces (shared by rendering and mesh)."""
        r = self.rot()
        pl = (p - self.center) @ r
        if not self.is_cyl:
            axis, pos = face // 2, face % 2
            h = self.half
            # u along the face's first in-plane axis, v along z for vertical faces
            ua = np.where(axis == 0, 1, 0)
            va = np.where(axis == 2, 1, 2)
            u = np.take_along_axis(pl, ua[:, None], 1)[:, 0] + h[ua]
            v = np.take_along_axis(pl, va[:, None], 1)[:, 0] + h[va]
            su, sv = u / (2 * h[ua]), v / (2 * h[va])
            nl = np.zeros_like(p)
            nl[np.arange(len(p)), axis] = np.where(pos == 1, 1.0, -1.0)
        else:
            rr, hz = self.radius, self.half[2]
            ang = np.arctan2(pl[:, 1], pl[:, 0]) + np.pi
            side = face == 0
            u = np.where(side, ang * rr, pl[:, 0] + rr)
            v = np.where(side, pl[:, 2] + hz, pl[:, 1] + rr)
            su = np.where(side, ang / (2 * np.pi), u / (2 * rr))
            sv = np.where(side, v / (2 * hz), v / (2 * rr))
            nl = np.zeros_like(p)
            rad = np.maximum(np.hypot(pl[:, 0], pl[:, 1]), 1e-9)
            nl[:, 0] = np.where(side, pl[:, 0] / rad, 0)
            nl[:, 1] = np.where(side, pl[:, 1] / rad, 0)
            nl[:, 2] = np.where(face == 1, 1.0, np.where(face == 2, -1.0, 0.0))
        return u, v, su, sv, nl @ r.T


@dataclass
class Room:
    size: np.ndarray             # (3,) x, y, z extents; the room is [0, size]
    ceiling: bool
    prims: list[Prim]
    wall_tint: np.ndarray
    seed: int

    @property
    def light(self) -> np.ndarray:
        return np.array([self.size[0] / 2, self.size[1] / 2, self.size[2] - 0.3])

    def intersect_room(self, o: np.ndarray, d: np.ndarray):
        """Interior faces: 0/1 x walls, 2/3 y walls, 4 floor, 5 ceiling (inf where no ceiling)."""
        ts = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                da = d[:, a]
                ta = np.where(da > 0, (self.size[a] - o[a]) / da, -o[a] / da)
                ts.append(np.where((da == 0) | np.isnan(ta), np.inf, ta))
        t0, t1, t2 = ts
        axis = np.where(t0 <= t1, np.where(t0 <= t2, 0, 2), np.where(t1 <= t2, 1, 2))
        tt = np.minimum(np.minimum(t0, t1), t2)
        face = 2 * axis + (np.where(axis == 0, d[:, 0], np.where(axis == 1, d[:, 1], d[:, 2])) > 0)
        if not self.ceiling:
            tt = np.where(face == 5, np.inf, tt)
        return tt, face

    def room_surface(self, face: np.ndarray, p: np.ndarray):
        axis = face // 2
        u = np.where(axis == 0, p[:, 1], p[:, 0])
        v = np.where(axis == 2, p[:, 1], p[:, 2])
        ext_u = np.where(axis == 0, self.size[1], self.size[0])
        ext_v = np.where(axis == 2, self.size[1], self.size[2])
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.where(face % 2 == 1, -1.0, 1.0)  # pointing into the room
        return u, v, u / ext_u, v / ext_v, n

    def shade(self, p: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Lambert from a point light under the ceiling plus ambient; view independent."""
        lv = self.light - p
        dist = np.linalg.norm(lv, axis=1) + 1e-9
        lam = np.clip((n * lv).sum(1) / dist, 0, 1)
        return 0.42 + 0.7 * lam / (1 + 0.06 * dist * dist)

    def colour(self, key_idx: np.ndarray, prim: Prim | None, u, v, su, sv, n, p) -> np.ndarray:
        """Shaded colour (M, 3) in [0, 1] of surface points of ``prim`` (None: the room itself)."""
        out = np.zeros((len(p), 3))
        seed = prim.seed if prim is not None else self.seed
        tint = prim.tint if prim is not None else self.wall_tint
        for k in np.unique(key_idx):
            sel = key_idx == k
            out[sel] = texture(KEYS[int(k)], u[sel], v[sel], su[sel], sv[sel], np.abs(n[sel, 2]) < 0.5, seed, tint)
        return np.clip(out * self.shade(p, n)[:, None], 0, 1)


# ----------------------------------------------------------------------------- layout

def _box(key, x, y, z0, sx, sy, sz, yaw=0.0, **kw) -> Prim:
    return Prim(key, np.array([x, y, z0 + sz / 2]), np.array([sx / 2, sy / 2, sz / 2]), yaw, **kw)


def _cyl(key, x, y, z0, r, h, **kw) -> Prim:
    return Prim(key, np.array([x, y, z0 + h / 2]), np.array([r, r, h / 2]), radius=r, **kw)


def _local(parts: list[tuple], cx, cy, yaw, key, seed, tint) -> list[Prim]:
    """Prims given in an object frame (x, y offsets, z0, sx, sy, sz | ('cyl', x, y, z0, r, h)),
    rotated by yaw about (cx, cy)."""
    c, s = np.cos(yaw), np.sin(yaw)
    out = []
    for part in parts:
        if part[0] == "cyl":
            _, x, y, z0, r, h = part
            out.append(_cyl(key, cx + c * x - s * y, cy + s * x + c * y, z0, r, h, seed=seed, tint=tint))
        else:
            x, y, z0, sx, sy, sz = part
            out.append(_box(key, cx + c * x - s * y, cy + s * x + c * y, z0, sx, sy, sz, yaw, seed=seed, tint=tint))
    return out


def _object(kind: str, rng: np.random.Generator) -> tuple[list[tuple], float, float, str]:
    """(parts in the object frame with its back at y = +depth/2, width, depth, key)."""
    u = rng.uniform
    if kind == "bed":
        w, d = u(1.9, 2.1), u(1.4, 1.7)
        return [(0, 0, 0, w, d, u(0.45, 0.55)), (w / 2 - 0.04, 0, 0, 0.08, d, u(0.9, 1.1))], w, d, "bed"
    if kind == "couch":
        w, d, h = u(1.6, 2.2), u(0.8, 0.95), u(0.4, 0.45)
        return [(0, -0.05, 0, w - 0.3, d - 0.1, h), (0, d / 2 - 0.1, 0, w, 0.2, h + 0.4),
                (-w / 2 + 0.075, -0.05, 0, 0.15, d - 0.1, h + 0.2), (w / 2 - 0.075, -0.05, 0, 0.15, d - 0.1, h + 0.2)
                ], w, d, "couch"
    if kind == "cabinet":
        w, d = u(0.6, 1.2), u(0.4, 0.6)
        return [(0, 0, 0, w, d, u(0.8, 1.9))], w, d, "cabinet"
    if kind == "bookshelf":
        w, d = u(0.8, 1.2), u(0.3, 0.4)
        return [(0, 0, 0, w, d, u(1.6, 2.0))], w, d, "bookshelf"
    if kind == "refrigerator":
        w, d = u(0.6, 0.8), u(0.6, 0.7)
        return [(0, 0, 0, w, d, u(1.7, 1.9))], w, d, "refrigerator"
    if kind == "desk":
        w, d, h = u(1.2, 1.6), u(0.6, 0.75), u(0.72, 0.76)
        return [(0, 0, h - 0.03, w, d, 0.03), (-w / 2 + 0.02, 0, 0, 0.04, d, h - 0.03),
                (w / 2 - 0.02, 0, 0, 0.04, d, h - 0.03)], w, d, "desk"
    if kind == "trash can":
        r = u(0.15, 0.22)
        return [("cyl", 0, 0, 0, r, u(0.35, 0.6))], 2 * r, 2 * r, "trash can"
    raise KeyError(kind)


def _chair(key: str, rng) -> list[tuple]:
    """A chair facing -y (its back at +y): seat, back and two side frames (or an office chair)."""
    s, h = rng.uniform(0.42, 0.5), rng.uniform(0.43, 0.47)
    if key == "office chair":
        return [("cyl", 0, 0, 0, 0.03, h - 0.06), (0, 0, h - 0.06, s, s, 0.06), (0, s / 2 - 0.03, h, s, 0.05, 0.45),
                ("cyl", 0, 0, 0, 0.28, 0.05)]
    return [(0, 0, h - 0.05, s, s, 0.05), (0, s / 2 - 0.025, h, s, 0.05, rng.uniform(0.4, 0.5)),
            (-s / 2 + 0.02, 0, 0, 0.04, s, h - 0.05), (s / 2 - 0.02, 0, 0, 0.04, s, h - 0.05)]


def _footprint(prims: list[Prim]) -> tuple[np.ndarray, np.ndarray]:
    c = np.concatenate([p.corners() for p in prims])
    return c.min(0), c.max(0)


def _free(lo, hi, taken, margin=0.1) -> bool:
    return all((hi[:2] + margin < a[:2]).any() or (lo[:2] - margin > b[:2]).any() for a, b in taken)


def make_room(rng: np.random.Generator, seed: int = 0) -> Room:
    """One procedural room (deterministic in ``rng``); the camera path is checked separately."""
    u = rng.uniform
    size = np.array([u(4.5, 7.0), u(4.0, 6.0), u(2.5, 3.0)])
    lx, ly, lz = size
    wall_tint = np.array([u(0.7, 0.95), u(0.7, 0.95), u(0.65, 0.9)])
    prims: list[Prim] = []
    taken: list[tuple] = []
    nseed = iter(range(seed * 1000 + 1, seed * 1000 + 1000))

    def tint():
        return rng.uniform(0.3, 0.7, 3)

    def wall_frame(wall: int, along: float, out: float):
        """Object frame on a wall: wall 0..3 = x=0, x=lx, y=0, y=ly; returns (cx, cy, yaw) with
        the object's +y (its back) towards the wall."""
        if wall == 0:
            return out, along, np.pi / 2
        if wall == 1:
            return lx - out, along, -np.pi / 2
        if wall == 2:
            return along, out, np.pi
        return along, ly - out, 0.0

    def wall_len(wall):
        return ly if wall < 2 else lx

    # wall-mounted flat things (2 cm thick, 1 cm proud of the wall)
    flats = [("door", 0.9, 0.0, 2.05)] + [("window", u(0.9, 1.5), u(0.8, 1.0), None) for _ in range(rng.integers(1, 3))]
    flats += [("picture", u(0.5, 1.0), u(1.3, 1.6), None) for _ in range(rng.integers(1, 3))]
    wall_spans: list[tuple[int, float, float]] = []
    for key, w, z0, h in flats:
        for _ in range(40):
            wall = int(rng.integers(0, 4))
            a = u(0.3 + w / 2, wall_len(wall) - 0.3 - w / 2)
            if all(wl != wall or abs(a - b) > (w + wb) / 2 + 0.2 for wl, b, wb in wall_spans):
                break
        else:
            continue
        wall_spans.append((wall, a, w))
        hh = h if h is not None else (min(u(1.0, 1.3), lz - 0.2 - z0) if key == "window" else
                                      min(w * u(0.6, 1.0), lz - 0.1 - z0))
        cx, cy, yaw = wall_frame(wall, a, 0.0)
        s = next(nseed)
        prims += _local([(0, 0, z0, w, 0.02, hh)], cx, cy, yaw, key, s, tint())
        if key == "window" and rng.uniform() < 0.7:   # a curtain beside it
            side = w / 2 + 0.25
            cx2, cy2, _ = wall_frame(wall, a + side if a + side < wall_len(wall) - 0.3 else a - side, 0.03)
            curtain = _local([(0, 0, 0.15, 0.4, 0.04, lz - 0.25)], cx2, cy2, yaw, "curtain", next(nseed), tint())
            prims += curtain
            taken.append(_footprint(curtain))
        if key == "door":  # keep the floor in front of the door free
            lo, hi = _footprint(_local([(0, -0.5, 0, w, 1.0, 0.1)], *wall_frame(wall, a, 0.0), "door", 0, tint()))
            taken.append((lo, hi))

    # furniture against the walls
    kinds = ["bed", "couch", "cabinet", "bookshelf", "refrigerator", "desk", "trash can", "cabinet"]
    rng.shuffle(kinds)
    for kind in kinds[: int(rng.integers(4, 7))]:
        parts, w, d, key = _object(kind, rng)
        for _ in range(40):
            wall = int(rng.integers(0, 4))
            if wall_len(wall) < w + 0.4:
                continue
            cx, cy, yaw = wall_frame(wall, u(0.1 + w / 2, wall_len(wall) - 0.1 - w / 2), d / 2 + 0.01)
            obj = _local(parts, cx, cy, yaw, key, next(nseed), tint())
            lo, hi = _footprint(obj)
            extra = []
            if kind == "desk":  # an office chair in front of it
                c, s = np.cos(yaw), np.sin(yaw)
                oy = -d / 2 - 0.1
                extra = _local(_chair("office chair", rng), cx - s * oy, cy + c * oy, yaw + np.pi, "office chair",
                               next(nseed), tint())
                lo2, hi2 = _footprint(extra)
                lo, hi = np.minimum(lo, lo2), np.maximum(hi, hi2)
            if _free(lo, hi, taken):
                prims += obj + extra
                taken.append((lo, hi))
                break

    # a table with chairs near the middle (rotated: exercises yawed boxes)
    key = "table" if rng.uniform() < 0.7 else "coffee table"
    tw, td = u(1.0, 1.5), u(0.7, 0.9)
    th = u(0.72, 0.76) if key == "table" else u(0.4, 0.48)
    leg = 0.03
    parts = [(0, 0, th - 0.04, tw, td, 0.04)] + [("cyl", sx * (tw / 2 - 0.08), sy * (td / 2 - 0.08), 0, leg, th - 0.04)
                                                  for sx in (-1, 1) for sy in (-1, 1)]
    tx, ty, tyaw = lx / 2 + u(-0.3, 0.3), ly / 2 + u(-0.3, 0.3), u(-0.5, 0.5)
    table = _local(parts, tx, ty, tyaw, key, next(nseed), tint())
    lo, hi = _footprint(table)
    if _free(lo, hi, taken):
        prims += table
        others = list(taken)   # chairs may tuck under the table: test them against the rest
        taken.append((lo, hi))
        if key == "table":
            ckey = "chair"
            for side in rng.permutation(4)[: int(rng.integers(2, 5))]:
                ang = tyaw + [0, np.pi / 2, np.pi, -np.pi / 2][side]
                dist = (td if side % 2 == 0 else tw) / 2 + 0.3
                cx, cy = tx - np.sin(ang) * dist, ty + np.cos(ang) * dist
                chair = _local(_chair(ckey, rng), cx, cy, ang, ckey, next(nseed), tint())  # back away from the table
                lo, hi = _footprint(chair)
                if _free(lo, hi, others, margin=0.02):
                    prims += chair
                    others.append((lo, hi))
                    taken.append((lo, hi))
    return Room(size, bool(rng.uniform() < 0.75), prims, wall_tint, seed)


def look_at(eye: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world pose, OpenCV camera (x right, y down, z forward), world z up."""
    fwd = target - eye
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    if roll:
        c, s = np.cos(roll), np.sin(roll)
        right, down = c * right + s * down, -s * right + c * down
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, fwd, eye
    return pose


def _clearance_ok(room: Room, eyes: np.ndarray) -> bool:
    """Eyes keep 0.4 m from walls and 0.35 m (horizontally) from anything reaching above 1 m."""
    if (eyes[:, :2] < 0.4).any() or (eyes[:, :2] > room.size[:2] - 0.4).any():
        return False
    for p in room.prims:
        c = p.corners()
        if c[:, 2].max() < 1.0:
            continue
        lo, hi = c.min(0)[:2] - 0.35, c.max(0)[:2] + 0.35
        if ((eyes[:, :2] > lo) & (eyes[:, :2] < hi)).all(1).any():
            return False
    return True


def trajectory(room: Room, n: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """An ellipse around the room's middle at ~1.4 m, looking across the room with a sweep.
    None if no ellipse keeps clear of tall furniture."""
    c = room.size / 2
    phase = rng.uniform(0, 2 * np.pi)
    a = phase + 2 * np.pi * np.arange(n) / n
    for f in (0.3, 0.25, 0.2, 0.15):
        eyes = np.stack([c[0] + f * room.size[0] * np.cos(a), c[1] + f * room.size[1] * np.sin(a),
                         1.4 + 0.1 * np.sin(3 * a)], 1)
        if _clearance_ok(room, eyes):
            break
    else:
        return None
    poses = []
    for ai, eye in zip(a, eyes):
        look = ai + np.pi + 0.6 * np.sin(2 * ai)
        target = eye + np.array([np.cos(look), np.sin(look), -0.45 + 0.1 * np.sin(5 * ai)])
        poses.append(look_at(eye, target, roll=0.03 * np.sin(7 * ai)))
    return poses


# ----------------------------------------------------------------------------- rendering

def _rect(prim: Prim, pose: np.ndarray, k, hw) -> tuple[int, int, int, int]:
    """The pixel rectangle (r0, r1, c0, c1) the prim can cover; the whole image if it straddles the camera."""
    h, w = hw
    pc = (prim.corners() - pose[:3, 3]) @ pose[:3, :3]
    if (pc[:, 2] <= 0).all():
        return 0, 0, 0, 0
    if (pc[:, 2] < 0.05).any():
        return 0, h, 0, w
    cols = k[0] * pc[:, 0] / pc[:, 2] + k[2]
    rows = k[1] * pc[:, 1] / pc[:, 2] + k[3]
    c0, c1 = max(0, int(np.floor(cols.min())) - 1), min(w, int(np.ceil(cols.max())) + 2)
    r0, r1 = max(0, int(np.floor(rows.min())) - 1), min(h, int(np.ceil(rows.max())) + 2)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else (0, 0, 0, 0)


def raycast(room: Room, pose: np.ndarray, k, hw):
    """Per pixel: z depth (m, inf = miss), hit owner (-1 room, else prim index), face, ray dirs."""
    h, w = hw
    rows, cols = np.mgrid[0:h, 0:w]
    d_cam = np.stack([(cols - k[2]) / k[0], (rows - k[3]) / k[1], np.ones((h, w))], -1)
    dirs = d_cam @ pose[:3, :3].T       # unit camera z: the ray parameter is the depth z
    dx, dy, dz = (np.ascontiguousarray(dirs[..., j]) for j in range(3))
    o = pose[:3, 3]
    t, face = room.intersect_room(o, dirs.reshape(-1, 3))
    t, face = t.reshape(h, w), face.reshape(h, w)
    owner = np.full((h, w), -1, np.int64)
    for i, p in enumerate(room.prims):
        r0, r1, c0, c1 = _rect(p, pose, k, hw)
        if r0 == r1:
            continue
        win = (slice(r0, r1), slice(c0, c1))
        tp, fp = p.intersect(o, dx[win], dy[win], dz[win])
        better = tp < t[win]
        t[win][better] = tp[better]
        face[win][better] = fp[better]
        owner[win][better] = i
    return t, owner, face, dirs


def _key_of_room_face(face: np.ndarray) -> np.ndarray:
    return np.where(face == 4, KEY_INDEX["floor"], np.where(face == 5, KEY_INDEX["ceiling"], KEY_INDEX["wall"]))


def render_full(room: Room, pose: np.ndarray, k, hw, with_rgb: bool = True):
    """Ray-cast one view: (rgb uint8 or None, z metres (0 = miss), class index per pixel
    (len(KEYS) = miss), cosine of incidence). k = (fx, fy, cx, cy)."""
    t, owner, face, dirs = raycast(room, pose, k, hw)
    h, w = hw
    hit = np.isfinite(t)
    hi = np.flatnonzero(hit)
    own = owner.ravel()[hi]
    order = np.argsort(own, kind="stable")    # group the hits by owner: contiguous slices
    hi, own = hi[order], own[order]
    fc = face.ravel()[hi]
    d = dirs.reshape(-1, 3)[hi]
    p = pose[:3, 3] + d * t.ravel()[hi][:, None]
    keys = np.zeros(len(hi), np.int64)
    nrm = np.zeros((len(hi), 3))
    col = np.zeros((len(hi), 3))
    ids, starts = np.unique(own, return_index=True)
    ends = np.append(starts[1:], len(own))
    for i, a, b in zip(ids, starts, ends):
        s = slice(a, b)
        prim = room.prims[i] if i >= 0 else None
        if prim is None:
            u, v, su, sv, n = room.room_surface(fc[s], p[s])
            ki = _key_of_room_face(fc[s])
        else:
            u, v, su, sv, n = prim.surface(fc[s], p[s])
            ki = np.full(b - a, KEY_INDEX[prim.key])
        keys[s], nrm[s] = ki, n
        if with_rgb:
            col[s] = room.colour(ki, prim, u, v, su, sv, n, p[s])
    key_idx = np.full(h * w, len(KEYS), np.int64)
    key_idx[hi] = keys
    cos = np.zeros(h * w)
    cos[hi] = np.abs((nrm * d).sum(1)) / np.linalg.norm(d, axis=1)
    z = np.where(hit, t, 0.0)
    rgb = None
    if with_rgb:
        rgb = np.zeros((h * w, 3), np.uint8)
        rgb[hi] = np.rint(col * 255).astype(np.uint8)
        rgb = rgb.reshape(h, w, 3)
    return rgb, z, key_idx.reshape(h, w), cos.reshape(h, w)


def render(room: Room, pose: np.ndarray, k, hw, rs: int = 0):
    """(rgb uint8, z metres (0 = miss), class index per pixel) of one view; ``rs`` is unused
    (kept for callers of the earlier signature)."""
    return render_full(room, pose, k, hw)[:3]


# ----------------------------------------------------------------------------- mesh

def _grid(nu: int, nv: int):
    idx = np.arange(nu * nv).reshape(nu, nv)
    a, b, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
    return np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])


def _n(extent: float, spacing: float) -> int:
    return max(2, int(np.ceil(extent / spacing)) + 1)


def _box_faces(prim: Prim, spacing: float):
    """(points, faces, face ids) of a box's six sides, gridded at <= spacing."""
    out = []
    h = prim.half
    for axis in range(3):
        ua, va = [a for a in range(3) if a != axis]
        nu, nv = _n(2 * h[ua], spacing), _n(2 * h[va], spacing)
        uu, vv = np.meshgrid(np.linspace(-h[ua], h[ua], nu), np.linspace(-h[va], h[va], nv), indexing="ij")
        for pos in (0, 1):
            pl = np.zeros((nu * nv, 3))
            pl[:, axis] = h[axis] if pos else -h[axis]
            pl[:, ua], pl[:, va] = uu.ravel(), vv.ravel()
            out.append((pl @ prim.rot().T + prim.center, _grid(nu, nv), 2 * axis + pos))
    return out


def _cyl_faces(prim: Prim, spacing: float):
    r, hz = prim.radius, prim.half[2]
    na = max(24, int(np.ceil(2 * np.pi * r / spacing)))
    ang = np.linspace(0, 2 * np.pi, na + 1)[:-1] - np.pi
    nz = _n(2 * hz, spacing)
    zz = np.linspace(-hz, hz, nz)
    a_, z_ = np.meshgrid(ang, zz, indexing="ij")
    side = np.stack([r * np.cos(a_).ravel(), r * np.sin(a_).ravel(), z_.ravel()], 1)
    f = _grid(na, nz)
    # close the seam: the last angle ring connects to the first
    idx = np.arange(na * nz).reshape(na, nz)
    a, b, c, d = idx[-1, :-1], idx[0, :-1], idx[0, 1:], idx[-1, 1:]
    f = np.concatenate([f, np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    out = [(side + prim.center, f, 0)]
    nr = max(1, int(np.ceil(r / spacing)))
    for face, zc in ((1, hz), (2, -hz)):
        pts = [np.array([[0.0, 0.0, zc]])]
        for j in range(1, nr + 1):
            rr = r * j / nr
            pts.append(np.stack([rr * np.cos(ang), rr * np.sin(ang), np.full(na, zc)], 1))
        pts = np.concatenate(pts)
        tris = [np.stack([np.zeros(na, int), 1 + np.arange(na), 1 + (np.arange(na) + 1) % na], 1)]
        for j in range(1, nr):
            i0, i1 = 1 + (j - 1) * na, 1 + j * na
            a = i0 + np.arange(na)
            b = i0 + (np.arange(na) + 1) % na
            c = i1 + (np.arange(na) + 1) % na
            d = i1 + np.arange(na)
            tris += [np.stack([a, d, c], 1), np.stack([a, c, b], 1)]
        out.append((pts + prim.center, np.concatenate(tris), face))
    return out


def build_mesh(room: Room, spacing: float = 0.05):
    """(xyz (V,3), rgb uint8 (V,3), faces (F,3), class index (V,)) of the room's visible surfaces."""
    parts = []  # (points, faces, key index, owner prim or None, face id)
    lx, ly, lz = room.size
    walls = [(0, np.array([0, 0, 0.0]), 1, 2, ly, lz), (1, np.array([lx, 0, 0.0]), 1, 2, ly, lz),
             (2, np.array([0, 0, 0.0]), 0, 2, lx, lz), (3, np.array([0, ly, 0.0]), 0, 2, lx, lz),
             (4, np.array([0, 0, 0.0]), 0, 1, lx, ly)]
    if room.ceiling:
        walls.append((5, np.array([0, 0, lz]), 0, 1, lx, ly))
    for face, origin, ua, va, eu, ev in walls:
        nu, nv = _n(eu, spacing), _n(ev, spacing)
        uu, vv = np.meshgrid(np.linspace(0, eu, nu), np.linspace(0, ev, nv), indexing="ij")
        pts = np.repeat(origin[None], nu * nv, 0)
        pts[:, ua] += uu.ravel()
        pts[:, va] += vv.ravel()
        parts.append((pts, _grid(nu, nv), int(_key_of_room_face(np.array([face]))[0]), None, face))
    for prim in room.prims:
        for pts, f, face in (_cyl_faces if prim.is_cyl else _box_faces)(prim, spacing):
            centre = pts.mean(0)
            # drop faces that no camera inside the room can see: on the floor or behind a wall
            if centre[2] < 1e-4 or (centre[:2] < -1e-4).any() or (centre[:2] > room.size[:2] + 1e-4).any():
                continue
            parts.append((pts, f, KEY_INDEX[prim.key], prim, face))
    xyz, faces, keys, cols, off = [], [], [], [], 0
    for pts, f, ki, prim, face in parts:
        fid = np.full(len(pts), face)
        if prim is None:
            u, v, su, sv, n = room.room_surface(fid, pts)
        else:
            u, v, su, sv, n = prim.surface(fid, pts)
        kk = np.full(len(pts), ki)
        cols.append(room.colour(kk, prim, u, v, su, sv, n, pts))
        xyz.append(pts), faces.append(f + off), keys.append(kk)
        off += len(pts)
    rgb = np.rint(np.concatenate(cols) * 255).astype(np.uint8)
    return np.concatenate(xyz), rgb, np.concatenate(faces), np.concatenate(keys)


# ----------------------------------------------------------------------------- writers

NYU40_PALETTE_SEED = 40


def label_colours(nyu: np.ndarray) -> np.ndarray:
    """A fixed colour per NYU40 id for the labels mesh (0 = black)."""
    ids = np.arange(41)
    pal = np.stack([_hash01(ids, ids * 0 + c, NYU40_PALETTE_SEED) for c in range(3)], 1)
    pal = (60 + pal * 195).astype(np.uint8)
    pal[0] = 0
    return pal[nyu]


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, label: np.ndarray | None) -> None:
    """Binary little-endian PLY as ScanNet ships it (vertex x y z, red green blue alpha[, label])."""
    props = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    if label is not None:
        props.append(("label", "<u2"))
    vert = np.zeros(len(xyz), dtype=props)
    vert["x"], vert["y"], vert["z"] = np.asarray(xyz, np.float32).T
    vert["red"], vert["green"], vert["blue"] = rgb.T
    vert["alpha"] = 255
    if label is not None:
        vert["label"] = label
    ply_t = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    head = ["ply", "format binary_little_endian 1.0", "comment lift3d synthetic", f"element vertex {len(xyz)}"]
    head += [f"property {ply_t[t]} {name}" for name, t in props]
    head += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    face = np.zeros(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"], face["i"] = 3, faces
    with open(path, "wb") as f:
        f.write(("\n".join(head) + "\n").encode())
        f.write(vert.tobytes())
        f.write(face.tobytes())


def write_sens(path: Path, color_k, depth_k, color_hw, depth_hw, frames) -> int:
    """Version-4 .sens from (fx, fy, cx, cy) intrinsics and (pose, jpeg bytes, zlib depth bytes) frames."""
    return _write_sens(path, intrinsics44(*color_k), intrinsics44(*depth_k), color_hw, depth_hw, frames)


def write_tsv(path: Path) -> None:
    """scannetv2-labels.combined.tsv rows for the ids the generator uses (ScanNet's columns)."""
    rows = ["\t".join(TSV_COLUMNS)]
    for key, (sid, raw, nyu, nyu_name) in sorted(CLASSES.items(), key=lambda kv: kv[1][0]):
        vals = {"id": sid, "raw_category": raw, "category": raw, "count": 1, "nyu40id": nyu, "nyuClass": nyu_name,
                "nyu40class": nyu_name}
        rows.append("\t".join(str(vals.get(c, "")) for c in TSV_COLUMNS))
    path.write_text("\n".join(rows) + "\n")


def camera_intrinsics(depth_hw) -> tuple[np.ndarray, np.ndarray]:
    """(depth K, colour K) as (fx, fy, cx, cy): ScanNet-like fields of view (~58 x 45 degrees);
    colour at twice the size with its own slightly different focal length and centre."""
    dh, dw = depth_hw
    depth_k = np.array([0.9 * dw, 0.9 * dw, (dw - 1) / 2 - 0.006 * dw, (dh - 1) / 2 - 0.004 * dh])
    ch, cw = 2 * dh, 2 * dw
    color_k = np.array([1.82 * cw / 2, 1.82 * cw / 2, (cw - 1) / 2 + 0.005 * cw, (ch - 1) / 2 + 0.003 * ch])
    return depth_k, color_k


def generate_scene(out: Path, scene: str, scene_seed: int, index: int, depth_hw=(120, 160), n_frames: int = 60,
                   jpeg_quality: int = 92, mesh_spacing: float = 0.05) -> dict:
    """Write one scene; returns a small summary."""
    rng = np.random.default_rng(scene_seed)
    for _ in range(50):
        room = make_room(rng, scene_seed)
        poses = trajectory(room, n_frames, rng)
        if poses is not None:
            break
    else:
        raise RuntimeError(f"synthetic: no clear camera path found for {scene} (seed {scene_seed})")
    dh, dw = depth_hw
    ch, cw = 2 * dh, 2 * dw
    depth_k, color_k = camera_intrinsics(depth_hw)
    sdir = out / "scans" / scene
    sdir.mkdir(parents=True, exist_ok=True)
    empty_at = 35 if index % 2 == 1 else -1   # one sensor dropout in odd scenes (if that long)
    frames, labels = [], []
    for i, pose in enumerate(poses):
        rgb, _, key_c, _ = render_full(room, pose, color_k, (ch, cw))
        _, z, _, cos = render_full(room, pose, depth_k, (dh, dw), with_rgb=False)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        depth_mm = np.clip(np.rint(z * 1000), 0, 65535).astype("<u2")
        depth_mm[(z > MAX_RANGE_M) | (cos < GRAZING_COS)] = 0
        if i == empty_at:
            depth_mm[:] = 0
        stored = pose.copy()
        if i % LOST_TRACKING[0] == LOST_TRACKING[1]:
            stored[:] = -np.inf
        frames.append((stored, jpg.tobytes(), zlib.compress(depth_mm.tobytes(), 6)))
        ok, png = cv2.imencode(".png", SCANNET_ID[key_c])
        labels.append((f"label-filt/{i}.png", png.tobytes()))
    write_sens(sdir / f"{scene}.sens", color_k, depth_k, (ch, cw), (dh, dw), frames)
    xyz, rgb8, faces, keys = build_mesh(room, mesh_spacing)
    nyu = NYU40_ID[keys]
    write_ply(sdir / f"{scene}_vh_clean_2.ply", xyz, rgb8, faces, None)
    write_ply(sdir / f"{scene}_vh_clean_2.labels.ply", xyz, label_colours(nyu), faces, nyu)
    with zipfile.ZipFile(sdir / f"{scene}_2d-label-filt.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, data in labels:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return {"scene": scene, "frames": n_frames, "vertices": len(xyz), "ceiling": room.ceiling}


def split_of(scenes: int) -> tuple[list[str], list[str]]:
    """(train, val) scene ids: the last third (at least one, if there are two or more) is val."""
    names = [f"scene{i:04d}_00" for i in range(scenes)]
    n_val = max(1, scenes // 3) if scenes > 1 else 0
    return names[: scenes - n_val], names[scenes - n_val:]


def generate(out, scenes: int = 6, seed: int = 0, depth_size=None, frames_per_scene: int | None = None,
             jpeg_quality: int | None = None, mesh_spacing: float | None = None) -> Path:
    """Write ``scenes`` rooms to ``out`` (byte-identical for the same arguments); returns ``out``."""
    out = Path(out)
    depth_hw = tuple(int(x) for x in (depth_size or DEFAULTS["depth_size"]))
    if len(depth_hw) != 2 or min(depth_hw) < 8:
        raise ValueError(f"depth_size must be [H, W] with H, W >= 8, got {depth_size}")
    n_frames = int(frames_per_scene or DEFAULTS["frames_per_scene"])
    q = int(jpeg_quality or DEFAULTS["jpeg_quality"])
    spacing = float(mesh_spacing or DEFAULTS["mesh_spacing"])
    out.mkdir(parents=True, exist_ok=True)
    train, val = split_of(scenes)
    for i, scene in enumerate(train + val):
        generate_scene(out, scene, seed * 100003 + i, i, depth_hw, n_frames, q, spacing)
    write_tsv(out / "scannetv2-labels.combined.tsv")
    (out / "scannetv2_train.txt").write_text("".join(s + "\n" for s in train))
    (out / "scannetv2_val.txt").write_text("".join(s + "\n" for s in val))
    return out


class Reader(scannet.Reader):
    """``kind: synthetic``: generate into ``<workdir>/raw/<name>`` once (again if its options
    change), then read it with the unchanged ScanNet reader."""

    kind = "synthetic"
    extra_keys = {"scenes": int, "seed": int, "frames_per_scene": int, "depth_size": list, "jpeg_quality": int,
                  "mesh_spacing": float, "color_align": str}
    MARKER = "COMPLETE.json"

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        self.options = {"scenes": int(entry.get("scenes") or 6), "seed": int(entry.get("seed") or 0),
                        "frames_per_scene": int(entry.get("frames_per_scene") or DEFAULTS["frames_per_scene"]),
                        "depth_size": [int(x) for x in (entry.get("depth_size") or DEFAULTS["depth_size"])],
                        "jpeg_quality": int(entry.get("jpeg_quality") or DEFAULTS["jpeg_quality"]),
                        "mesh_spacing": float(entry.get("mesh_spacing") or DEFAULTS["mesh_spacing"]),
                        "version": VERSION}
        self.options_sha256 = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()
        self.root = Path(entry["root"]) if entry.get("root") else Path(workdir) / "raw" / entry["name"]

    def is_prepared(self) -> bool:
        marker = self.root / self.MARKER
        try:
            return json.loads(marker.read_text()).get("options_sha256") == self.options_sha256
        except (OSError, ValueError):
            return False

    def prepare(self) -> None:
        if self.is_prepared():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root.with_name(f"{self.root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        o = self.options
        generate(tmp, o["scenes"], o["seed"], o["depth_size"], o["frames_per_scene"], o["jpeg_quality"],
                 o["mesh_spacing"])
        (tmp / self.MARKER).write_text(json.dumps({"options": o, "options_sha256": self.options_sha256},
                                                  sort_keys=True))
        old = self.root.with_name(f"{self.root.name}.old-{os.getpid()}")
        if self.root.exists():
            self.root.rename(old)   # a stale or half-written copy is moved aside, then removed
        try:
            tmp.rename(self.root)   # the complete dataset appears in one step
        except OSError:
            if not self.is_prepared():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same generation first
        shutil.rmtree(old, ignore_errors=True)

    def scenes(self) -> list[str]:
        if not self.is_prepared():
            self.prepare()
        return super().scenes()

    def stored_size(self) -> tuple[int, int]:
        return entry_image_size(self.entry) or tuple(self.options["depth_size"])

    def frames(self, scene: str, frame_skip: int):
        if not self.is_prepared():
            raise ReaderError(f"{self.root}: the synthetic dataset is not generated (or its options changed); "
                              f"run the frames stage, which prepares it first")
        return super().frames(scene, frame_skip)
