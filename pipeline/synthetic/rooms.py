"""The synthetic rooms: classes, procedural textures, primitives, room layouts and camera paths."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# key: (ScanNet label id, raw category, NYU40 id, NYU40 class). Several raw categories map to one
# NYU40 class (chair / office chair, table / coffee table) as in ScanNet's table.
CLASSES = {
    "wall": (1, "wall", 1, "wall"),
    "chair": (2, "chair", 5, "chair"),
    "floor": (3, "floor", 2, "floor"),
    "table": (4, "table", 7, "table"),
    "door": (5, "door", 8, "door"),
    "couch": (6, "couch", 6, "sofa"),
    "cabinet": (7, "cabinet", 3, "cabinet"),
    "desk": (9, "desk", 14, "desk"),
    "office chair": (10, "office chair", 5, "chair"),
    "bed": (11, "bed", 4, "bed"),
    "bookshelf": (13, "bookshelf", 10, "bookshelf"),
    "picture": (14, "picture", 11, "picture"),
    "window": (15, "window", 9, "window"),
    "curtain": (19, "curtain", 16, "curtain"),
    "coffee table": (22, "coffee table", 7, "table"),
    "refrigerator": (24, "refrigerator", 24, "refridgerator"),
    "trash can": (25, "trash can", 39, "otherfurniture"),
    "ceiling": (41, "ceiling", 22, "ceiling"),
}
KEYS = list(CLASSES)
KEY_INDEX = {k: i for i, k in enumerate(KEYS)}
SCANNET_ID = np.array([CLASSES[k][0] for k in KEYS] + [0], np.uint16)  # last entry: no hit
NYU40_ID = np.array([CLASSES[k][2] for k in KEYS] + [0], np.uint16)

# ----------------------------------------------------------------------------- textures


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic integer hash of lattice points -> [0, 1]."""
    h = ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + (seed % 1000003) * 1442695041
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


def texture(
    key: str,
    u: np.ndarray,
    v: np.ndarray,
    su: np.ndarray,
    sv: np.ndarray,
    vertical: np.ndarray,
    seed: int,
    tint: np.ndarray,
) -> np.ndarray:
    """Albedo (M, 3) in [0, 1] for class ``key`` at surface coordinates u, v (metres; v is up on
    vertical faces) and face-normalised su, sv in [0, 1]. ``tint``: the object's colour jitter."""
    n_fine = value_noise(u, v, 0.02, seed + 7)
    if key == "wall":  # painted plaster: large soft blotches
        base = tint * (0.9 + 0.1 * value_noise(u, v, 0.6, seed))[:, None]
    elif key == "floor":  # wooden planks along u
        plank = np.floor(v / 0.18)
        shade = _hash01(plank, plank * 0 + 3, seed)
        grain = 0.5 + 0.5 * np.sin(u * 25 + 6 * value_noise(u, v, 0.3, seed + 1) + plank * 2.3)
        base = np.array([0.55, 0.35, 0.18]) * (0.8 + 0.25 * shade)[:, None] + 0.08 * grain[:, None]
        base = _mix(np.mod(v, 0.18) < 0.008, base, [0.2, 0.12, 0.06])
    elif key == "ceiling":
        base = np.array([0.93, 0.93, 0.9]) * (0.97 + 0.03 * n_fine)[:, None]
    elif key == "bed":  # blue and white stripes
        base = _mix(np.mod(u, 0.16) < 0.08, [0.12, 0.22, 0.65], [0.92, 0.92, 0.96])
    elif key == "chair":  # red cloth with a fine checker weave
        c = (np.floor(u / 0.025) + np.floor(v / 0.025)) % 2
        base = _mix(c > 0, [0.75, 0.1, 0.08], [0.55, 0.05, 0.05])
    elif key == "office chair":  # black mesh with diagonal lines
        d = np.mod(u + v, 0.04) < 0.012
        base = _mix(d, [0.1, 0.1, 0.12], [0.35, 0.35, 0.4])
    elif key == "couch":  # green velvet
        base = np.array([0.12, 0.5, 0.2]) * (0.7 + 0.5 * value_noise(u, v, 0.08, seed))[:, None]
    elif key in ("table", "coffee table"):  # wood with rings
        r = np.hypot((su - 0.5) * 3.0, (sv - 0.5) * 0.7) * 30 + 3 * value_noise(u, v, 0.2, seed)
        wood = np.array([0.78, 0.56, 0.3]) if key == "table" else np.array([0.35, 0.2, 0.1])
        base = wood * (0.82 + 0.18 * np.sin(r))[:, None]
    elif key == "cabinet":  # dark wood, vertical grain, door seams and handles
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
    elif key == "picture":  # a colourful painting in a black frame
        p = np.sin(su * 9 + seed) + np.sin(sv * 7 + 2 * np.sin(su * 5)) + np.sin((su + sv) * 6)
        art = np.stack(
            [0.5 + 0.45 * np.sin(p * 1.7), 0.5 + 0.45 * np.sin(p * 1.7 + 2), 0.5 + 0.45 * np.sin(p * 1.7 + 4)], 1
        )
        frame = (su < 0.06) | (su > 0.94) | (sv < 0.06) | (sv > 0.94)
        base = _mix(frame, art, [0.05, 0.05, 0.05])
    elif key == "window":  # sky gradient with white mullions
        sky = np.stack([0.55 + 0.3 * sv, 0.75 + 0.2 * sv, 0.98 + 0 * sv], 1)
        bars = (
            (np.abs(su - 0.5) < 0.025)
            | (np.abs(sv - 0.55) < 0.025)
            | (su < 0.04)
            | (su > 0.96)
            | (sv < 0.05)
            | (sv > 0.95)
        )
        base = _mix(bars, sky, [0.95, 0.95, 0.95])
    elif key == "door":  # brown with four recessed panels
        pu, pv = np.mod(su * 2, 1.0), np.mod(sv * 2, 1.0)
        groove = ((np.abs(pu - 0.15) < 0.03) | (np.abs(pu - 0.85) < 0.03)) & (pv > 0.12) & (pv < 0.88) | (
            (np.abs(pv - 0.12) < 0.02) | (np.abs(pv - 0.88) < 0.02)
        ) & (pu > 0.15) & (pu < 0.85)
        base = _mix(groove, [0.55, 0.33, 0.17], [0.28, 0.16, 0.08])
        knob = np.hypot((su - 0.88) * 0.9, (sv - 0.47) * 2.05) < 0.035
        base = _mix(knob & vertical, base, [0.85, 0.75, 0.3])
    elif key == "desk":  # grey laminate with speckle
        base = np.array([0.55, 0.56, 0.58]) * (0.85 + 0.3 * (n_fine > 0.8))[:, None]
    elif key == "curtain":  # purple folds
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
    radius: float = 0.0  # > 0: cylinder of this radius, z extent from ``half[2]``
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
    size: np.ndarray  # (3,) x, y, z extents; the room is [0, size]
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
        return (
            [
                (0, -0.05, 0, w - 0.3, d - 0.1, h),
                (0, d / 2 - 0.1, 0, w, 0.2, h + 0.4),
                (-w / 2 + 0.075, -0.05, 0, 0.15, d - 0.1, h + 0.2),
                (w / 2 - 0.075, -0.05, 0, 0.15, d - 0.1, h + 0.2),
            ],
            w,
            d,
            "couch",
        )
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
        return (
            [
                (0, 0, h - 0.03, w, d, 0.03),
                (-w / 2 + 0.02, 0, 0, 0.04, d, h - 0.03),
                (w / 2 - 0.02, 0, 0, 0.04, d, h - 0.03),
            ],
            w,
            d,
            "desk",
        )
    if kind == "trash can":
        r = u(0.15, 0.22)
        return [("cyl", 0, 0, 0, r, u(0.35, 0.6))], 2 * r, 2 * r, "trash can"
    raise KeyError(kind)


def _chair(key: str, rng) -> list[tuple]:
    """A chair facing -y (its back at +y): seat, back and two side frames (or an office chair)."""
    s, h = rng.uniform(0.42, 0.5), rng.uniform(0.43, 0.47)
    if key == "office chair":
        return [
            ("cyl", 0, 0, 0, 0.03, h - 0.06),
            (0, 0, h - 0.06, s, s, 0.06),
            (0, s / 2 - 0.03, h, s, 0.05, 0.45),
            ("cyl", 0, 0, 0, 0.28, 0.05),
        ]
    return [
        (0, 0, h - 0.05, s, s, 0.05),
        (0, s / 2 - 0.025, h, s, 0.05, rng.uniform(0.4, 0.5)),
        (-s / 2 + 0.02, 0, 0, 0.04, s, h - 0.05),
        (s / 2 - 0.02, 0, 0, 0.04, s, h - 0.05),
    ]


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
        hh = (
            h
            if h is not None
            else (min(u(1.0, 1.3), lz - 0.2 - z0) if key == "window" else min(w * u(0.6, 1.0), lz - 0.1 - z0))
        )
        cx, cy, yaw = wall_frame(wall, a, 0.0)
        s = next(nseed)
        prims += _local([(0, 0, z0, w, 0.02, hh)], cx, cy, yaw, key, s, tint())
        if key == "window" and rng.uniform() < 0.7:  # a curtain beside it
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
                extra = _local(
                    _chair("office chair", rng),
                    cx - s * oy,
                    cy + c * oy,
                    yaw + np.pi,
                    "office chair",
                    next(nseed),
                    tint(),
                )
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
    parts = [(0, 0, th - 0.04, tw, td, 0.04)] + [
        ("cyl", sx * (tw / 2 - 0.08), sy * (td / 2 - 0.08), 0, leg, th - 0.04) for sx in (-1, 1) for sy in (-1, 1)
    ]
    tx, ty, tyaw = lx / 2 + u(-0.3, 0.3), ly / 2 + u(-0.3, 0.3), u(-0.5, 0.5)
    table = _local(parts, tx, ty, tyaw, key, next(nseed), tint())
    lo, hi = _footprint(table)
    if _free(lo, hi, taken):
        prims += table
        others = list(taken)  # chairs may tuck under the table: test them against the rest
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
        eyes = np.stack(
            [c[0] + f * room.size[0] * np.cos(a), c[1] + f * room.size[1] * np.sin(a), 1.4 + 0.1 * np.sin(3 * a)], 1
        )
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
