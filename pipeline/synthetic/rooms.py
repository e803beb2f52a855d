"""The synthetic rooms: classes, the shared pool of materials, primitives, room layouts and camera paths."""

from __future__ import annotations

import itertools
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

# ----------------------------------------------------------------------------- appearance


_HX, _HY, _HS = 374761393, 668265263, 1442695041


def _finish(h: np.ndarray) -> np.ndarray:
    h &= 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 0xFFFF) / 65535.0


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic integer hash of lattice points -> [0, 1]."""
    return _finish(ix.astype(np.int64) * _HX + iy.astype(np.int64) * _HY + (seed % 1000003) * _HS)


def value_noise(u: np.ndarray, v: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with feature size ``scale`` (metres)."""
    x, y = u / scale, v / scale
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    h = ix.astype(np.int64) * _HX + iy.astype(np.int64) * _HY + (seed % 1000003) * _HS  # the corners: + _HX, _HY
    a, b = _finish(h.copy()), _finish(h + _HX)
    c, d = _finish(h + _HY), _finish(h + (_HX + _HY))
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _mix(mask: np.ndarray, a, b) -> np.ndarray:
    """(M, 3): ``b`` where ``mask`` else ``a`` (each a colour (3,) or per-point colours (M, 3))."""
    m = mask.astype(np.float64)[:, None]
    return m * np.asarray(b, np.float64) + (1 - m) * np.asarray(a, np.float64)


def _scaled(c: np.ndarray, f: np.ndarray) -> np.ndarray:
    return c[None, :] * f[:, None]


# The shared pool of materials. A material is a pattern in surface coordinates (u, v in metres, v up on
# vertical faces; su, sv in [0, 1] across the face) painted with the instance's three colours c0, c1, c2
# and shaped by its four parameters p in [0, 1) (period, orientation, duty, ...). No material belongs to
# a class: any instance of any class can get any of them.


def _paint(c, p, s, u, v, su, sv, vert):  # plain paint with large soft blotches
    return _scaled(c[0], 0.9 + 0.1 * value_noise(u, v, 0.6, s))


def _stripes(c, p, s, u, v, su, sv, vert):
    x = u if p[1] < 0.5 else v
    period = 0.05 + 0.35 * p[0]
    return _mix(np.mod(x, period) < (0.25 + 0.5 * p[2]) * period, c[0], c[1])


def _checker(c, p, s, u, v, su, sv, vert):
    cell = 0.02 + 0.12 * p[0]
    return _mix((np.floor(u / cell) + np.floor(v / cell)) % 2 > 0, c[0], c[1])


def _wood_grain(c, p, s, u, v, su, sv, vert):  # grain lines, optionally with seams between boards or doors
    x = u if p[1] < 0.5 else v
    grain = np.sin(x * (25 + 60 * p[0]) + 8 * value_noise(u, v, 0.25, s))
    base = _scaled(c[0], 0.82 + 0.18 * grain)
    if p[2] < 0.5:
        base = _mix(np.mod(x, 0.3 + 0.4 * p[3]) < 0.012, base, 0.35 * c[0])
    return base


def _wood_rings(c, p, s, u, v, su, sv, vert):  # growth rings around the face's middle
    r = np.hypot((su - 0.5) * 3.0, (sv - 0.5) * 0.7) * (15 + 30 * p[0]) + 3 * value_noise(u, v, 0.2, s)
    return _scaled(c[0], 0.8 + 0.2 * np.sin(r))


def _velvet(c, p, s, u, v, su, sv, vert):
    return _scaled(c[0], 0.65 + 0.55 * value_noise(u, v, 0.04 + 0.1 * p[0], s))


def _dots(c, p, s, u, v, su, sv, vert):
    sp = 0.04 + 0.12 * p[0]
    return _mix(np.hypot(np.mod(u, sp) - sp / 2, np.mod(v, sp) - sp / 2) < sp * (0.12 + 0.22 * p[1]), c[0], c[1])


def _planks(c, p, s, u, v, su, sv, vert):  # boards with a shade each, grain and dark seams
    w = 0.08 + 0.22 * p[0]
    along, across = (u, v) if p[1] < 0.5 else (v, u)
    plank = np.floor(across / w)
    shade = _hash01(plank, plank * 0 + 3, s)
    grain = np.sin(along * 25 + 6 * value_noise(u, v, 0.3, s + 1) + plank * 2.3)
    base = _scaled(c[0], 0.78 + 0.25 * shade + 0.06 * grain)
    return _mix(np.mod(across, w) < 0.008, base, 0.35 * c[0])


def _speckle(c, p, s, u, v, su, sv, vert):  # laminate with speckles of the second colour
    fine = value_noise(u, v, 0.012 + 0.02 * p[0], s + 3)
    return _mix(fine > 0.8 - 0.1 * p[1], _scaled(c[0], 0.95 + 0.1 * fine), c[1])


def _mesh(c, p, s, u, v, su, sv, vert):  # diagonal lines
    per = 0.02 + 0.05 * p[0]
    return _mix(np.mod(u + v if p[1] < 0.5 else u - v, per) < per * (0.2 + 0.3 * p[2]), c[0], c[1])


def _folds(c, p, s, u, v, su, sv, vert):  # soft vertical folds
    f = np.sin(u * (15 + 45 * p[0]) + 2 * value_noise(u, v, 0.5, s))
    return _scaled(c[0], 0.6 + 0.4 * f * f)


def _blocks(c, p, s, u, v, su, sv, vert):  # rows of blocks in the three colours, dark gaps between rows
    bw, rh = 0.03 + 0.2 * p[0], 0.15 + 0.4 * p[1]
    row = np.floor(v / rh)
    k = np.floor(u / bw + row * 0.37)
    which = np.minimum((_hash01(k, row, s) * 3).astype(np.int64), 2)
    base = c[which] * (0.75 + 0.25 * _hash01(k, row, s + 1))[:, None]
    return _mix(np.mod(v, rh) < 0.02, base, 0.35 * c[0])


def _painting(c, p, s, u, v, su, sv, vert):  # swirls blending the three colours
    f = 3 + 9 * p[0]
    x, y = u * f, v * f
    q = np.sin(x + (s % 6283) / 1000) + np.sin(0.8 * y + 2 * np.sin(0.6 * x)) + np.sin(0.7 * (x + y))
    w = np.stack([(0.5 + 0.5 * np.sin(1.7 * q + 2.1 * k)) ** 2 for k in range(3)], 1) + 1e-3
    return (w / w.sum(1, keepdims=True)) @ c


def _gradient(c, p, s, u, v, su, sv, vert):  # c0 at the bottom (or one edge) to c1 at the top
    t = np.clip(sv if p[0] < 0.7 else su, 0, 1)[:, None]
    return (1 - t) * c[0] + t * c[1]


def _panels(c, p, s, u, v, su, sv, vert):  # recessed panels on a grid across the face
    pu, pv = np.mod(su * (1 + np.floor(3 * p[0])), 1.0), np.mod(sv * (1 + np.floor(3 * p[1])), 1.0)
    inner_u, inner_v = (pu > 0.1) & (pu < 0.9), (pv > 0.1) & (pv < 0.9)
    groove = ((np.abs(pu - 0.1) < 0.03) | (np.abs(pu - 0.9) < 0.03)) & inner_v
    groove |= ((np.abs(pv - 0.1) < 0.03) | (np.abs(pv - 0.9) < 0.03)) & inner_u
    return _mix(groove, c[0], 0.5 * c[0])


MATERIALS = {
    "paint": _paint,
    "stripes": _stripes,
    "checker": _checker,
    "wood grain": _wood_grain,
    "wood rings": _wood_rings,
    "velvet": _velvet,
    "dots": _dots,
    "planks": _planks,
    "speckle": _speckle,
    "mesh": _mesh,
    "folds": _folds,
    "blocks": _blocks,
    "painting": _painting,
    "gradient": _gradient,
    "panels": _panels,
}
MATERIAL_NAMES = list(MATERIALS)

# Tendencies, as real classes have them: sampling weights over the one pool (every material keeps weight 1
# unless raised here). No class has a material of its own, and the colours never depend on the class.
TENDENCIES = {
    "wall": {"paint": 24, "speckle": 2, "stripes": 2, "panels": 2},
    "ceiling": {"paint": 30, "speckle": 3, "panels": 2},
    "floor": {"planks": 10, "checker": 3, "speckle": 3, "wood grain": 2, "paint": 2},
    "door": {"panels": 3, "wood grain": 2, "paint": 2},
    "window": {"gradient": 3},
    "picture": {"painting": 3},
    "curtain": {"folds": 3, "stripes": 2, "velvet": 2},
    "bookshelf": {"blocks": 3, "wood grain": 2},
    "bed": {"stripes": 2, "velvet": 2},
    "couch": {"velvet": 2},
    "chair": {"checker": 2, "velvet": 2},
    "office chair": {"mesh": 2},
    "cabinet": {"wood grain": 2, "panels": 2},
    "desk": {"speckle": 2, "wood grain": 2},
    "table": {"wood rings": 2, "wood grain": 2},
    "coffee table": {"wood rings": 2, "wood grain": 2},
    "refrigerator": {"paint": 3, "speckle": 2},
    "trash can": {"paint": 2, "dots": 2},
    # legs, frames and bases of any class
    "frame": {"paint": 4, "wood grain": 3, "speckle": 3},
}


def material_weights(role: str) -> np.ndarray:
    """Sampling probabilities over MATERIAL_NAMES for a class key (or "frame")."""
    w = np.array([float(TENDENCIES.get(role, {}).get(m, 1.0)) for m in MATERIAL_NAMES])
    return w / w.sum()


_WEIGHTS = {role: material_weights(role) for role in [*KEYS, "frame"]}


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """(…, 3) RGB in [0, 1] from hue, saturation and value in [0, 1]."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float), np.asarray(s, float), np.asarray(v, float))
    k = np.mod(np.stack([5.0, 3.0, 1.0], -1) + 6 * h[..., None], 6)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def draw_colours(rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """(n, 3) RGB: the one colour distribution every instance of every class draws from. About a third are
    near-neutral (whites, greys, blacks), the rest any hue at low to high saturation; value 0.18-0.95."""
    h = rng.uniform(0, 1, n)
    neutral = rng.uniform(0, 1, n) < 0.35
    s = np.where(neutral, rng.uniform(0, 0.12, n), rng.uniform(0.12, 0.85, n))
    v = rng.uniform(0.18, 0.95, n)
    return hsv_to_rgb(h, s, v)


@dataclass
class Look:
    """An instance's appearance: a material from the shared pool, its colours and pattern parameters."""

    material: str
    colours: np.ndarray  # (3, 3) RGB in [0, 1]
    params: np.ndarray  # (4,) in [0, 1)
    seed: int

    def albedo(self, u, v, su, sv, vertical) -> np.ndarray:
        """(M, 3) in [0, 1] at surface coordinates u, v (metres) and face-normalised su, sv."""
        base = MATERIALS[self.material](self.colours, self.params, self.seed, u, v, su, sv, vertical)
        return np.clip(base + 0.05 * (value_noise(u, v, 0.02, self.seed + 7) - 0.5)[:, None], 0, 1)


def draw_look(role: str, rng: np.random.Generator, seed: int) -> Look:
    """A new instance's look: material by the role's weights, colours from the shared distribution."""
    material = MATERIAL_NAMES[int(rng.choice(len(MATERIAL_NAMES), p=_WEIGHTS[role]))]
    return Look(material, draw_colours(rng), rng.uniform(0, 1, 4), int(seed))


def _plain_look() -> Look:
    return Look("paint", np.full((3, 3), 0.5), np.full(4, 0.5), 0)


# ----------------------------------------------------------------------------- primitives


@dataclass
class Prim:
    """A box (``half`` extents, rotated by ``yaw`` about z) or a vertical cylinder (``radius``)."""

    key: str
    center: np.ndarray
    half: np.ndarray
    yaw: float = 0.0
    radius: float = 0.0  # > 0: cylinder of this radius, z extent from ``half[2]``
    look: Look = field(default_factory=_plain_look)
    obj: int = -1  # the object (instance) this part belongs to

    @property
    def material(self) -> str:
        return self.look.material

    @property
    def colours(self) -> np.ndarray:
        return self.look.colours

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

    def intersect(self, o: np.ndarray, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, with_face: bool = True):
        """(t, face) per ray (direction components dx, dy, dz, any shape); t = inf where missed.
        Box faces 2*axis + (positive side); cylinder faces 0 side, 1 top, 2 bottom. Without
        ``with_face``, face is None (cheaper). Boxes keep float32 rays in float32."""
        r = self.rot()
        ol = r.T @ (o - self.center)
        # world -> local (a yaw about z): local = r^T d; boxes compute in the rays' dtype
        f = dx.dtype.type if not self.is_cyl else np.float64
        lx, ly, lz = f(r[0, 0]) * dx + f(r[1, 0]) * dy, f(r[0, 1]) * dx + f(r[1, 1]) * dy, dz
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if not self.is_cyl:
                near, far = [], []
                for a, da in enumerate((lx, ly, lz)):
                    inv = f(1.0) / da
                    t1 = f(-self.half[a] - ol[a]) * inv
                    t2 = f(self.half[a] - ol[a]) * inv
                    near.append(np.minimum(t1, t2))
                    far.append(np.maximum(t1, t2))
                n0, n1, n2 = near
                tn = np.maximum(np.maximum(n0, n1), n2)
                tf = np.minimum(np.minimum(far[0], far[1]), far[2])
                t = np.where((tn <= tf) & (tn > 1e-6), tn, np.inf)
                if not with_face:
                    return t, None
                axis = np.where(n0 >= n1, np.where(n0 >= n2, 0, 2), np.where(n1 >= n2, 1, 2))
                neg = np.where(axis == 0, lx, np.where(axis == 1, ly, lz)) < 0
                return t, 2 * axis + neg
            rr, hz = self.radius, self.half[2]
            a = lx * lx + ly * ly
            b = 2 * (ol[0] * lx + ol[1] * ly)
            c = ol[0] ** 2 + ol[1] ** 2 - rr * rr
            disc = b * b - 4 * a * c
            ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
            zs = ol[2] + ts * lz
            best = np.where((disc >= 0) & (a > 0) & (ts > 1e-6) & (np.abs(zs) <= hz), ts, np.inf)
            face = np.zeros(best.shape, np.int64) if with_face else None
            for f, zc in ((1, hz), (2, -hz)):
                tc = (zc - ol[2]) / lz
                xc, yc = ol[0] + tc * lx, ol[1] + tc * ly
                tc = np.where((tc > 1e-6) & (xc * xc + yc * yc <= rr * rr), tc, np.inf)
                better = tc < best
                best = np.where(better, tc, best)
                if with_face:
                    face = np.where(better, f, face)
            return best, face

    def normal(self, face: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Unit outward normals (M, 3) at world points p on the given faces."""
        r = self.rot()
        nl = np.zeros_like(p)
        if not self.is_cyl:
            nl[np.arange(len(p)), face // 2] = np.where(face % 2 == 1, 1.0, -1.0)
        else:
            pl = (p - self.center) @ r
            side = face == 0
            rad = np.maximum(np.hypot(pl[:, 0], pl[:, 1]), 1e-9)
            nl[:, 0] = np.where(side, pl[:, 0] / rad, 0)
            nl[:, 1] = np.where(side, pl[:, 1] / rad, 0)
            nl[:, 2] = np.where(face == 1, 1.0, np.where(face == 2, -1.0, 0.0))
        return nl @ r.T

    def surface(self, face: np.ndarray, p: np.ndarray):
        """(u, v, su, sv, normal) at world points p on the given faces (shared by rendering and mesh)."""
        r = self.rot()
        pl = (p - self.center) @ r
        if not self.is_cyl:
            axis = face // 2
            h = self.half
            # u along the face's first in-plane axis, v along z for vertical faces
            ua = np.where(axis == 0, 1, 0)
            va = np.where(axis == 2, 1, 2)
            u = np.take_along_axis(pl, ua[:, None], 1)[:, 0] + h[ua]
            v = np.take_along_axis(pl, va[:, None], 1)[:, 0] + h[va]
            su, sv = u / (2 * h[ua]), v / (2 * h[va])
        else:
            rr, hz = self.radius, self.half[2]
            ang = np.arctan2(pl[:, 1], pl[:, 0]) + np.pi
            side = face == 0
            u = np.where(side, ang * rr, pl[:, 0] + rr)
            v = np.where(side, pl[:, 2] + hz, pl[:, 1] + rr)
            su = np.where(side, ang / (2 * np.pi), u / (2 * rr))
            sv = np.where(side, v / (2 * hz), v / (2 * rr))
        return u, v, su, sv, self.normal(face, p)


@dataclass
class Room:
    size: np.ndarray  # (3,) x, y, z extents; the room is [0, size]
    ceiling: bool
    prims: list[Prim]
    looks: list[Look]  # per room face: 0/1 x walls, 2/3 y walls, 4 floor, 5 ceiling
    seed: int

    @property
    def light(self) -> np.ndarray:
        return np.array([self.size[0] / 2, self.size[1] / 2, self.size[2] - 0.3])

    def intersect_room(self, o: np.ndarray, d: np.ndarray):
        """Interior faces: 0/1 x walls, 2/3 y walls, 4 floor, 5 ceiling (inf where no ceiling)."""
        ts = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                da = np.ascontiguousarray(d[:, a])
                ta = (np.where(da > 0, self.size[a], 0.0) - o[a]) / da
                ts.append(np.where((da == 0) | np.isnan(ta), np.inf, ta))
        t0, t1, t2 = ts
        axis = np.where(t0 <= t1, np.where(t0 <= t2, 0, 2), np.where(t1 <= t2, 1, 2))
        tt = np.minimum(np.minimum(t0, t1), t2)
        face = 2 * axis + (np.where(axis == 0, d[:, 0], np.where(axis == 1, d[:, 1], d[:, 2])) > 0)
        if not self.ceiling:
            tt = np.where(face == 5, np.inf, tt)
        return tt, face

    @staticmethod
    def room_normal(face: np.ndarray) -> np.ndarray:
        """Unit normals (M, 3) of the room's faces, pointing into the room."""
        n = np.zeros((len(face), 3))
        n[np.arange(len(face)), face // 2] = np.where(face % 2 == 1, -1.0, 1.0)
        return n

    def room_surface(self, face: np.ndarray, p: np.ndarray):
        axis = face // 2
        u = np.where(axis == 0, p[:, 1], p[:, 0])
        v = np.where(axis == 2, p[:, 1], p[:, 2])
        ext_u = np.where(axis == 0, self.size[1], self.size[0])
        ext_v = np.where(axis == 2, self.size[1], self.size[2])
        return u, v, u / ext_u, v / ext_v, self.room_normal(face)

    def shade(self, p: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Lambert from a point light under the ceiling plus ambient; view independent."""
        lv = self.light - p
        d2 = np.einsum("ij,ij->i", lv, lv)
        lam = np.clip(np.einsum("ij,ij->i", n, lv) / (np.sqrt(d2) + 1e-9), 0, 1)
        return 0.42 + 0.7 * lam / (1 + 0.06 * d2)

    def colour(self, key_idx: np.ndarray, prim: Prim | None, u, v, su, sv, n, p) -> np.ndarray:
        """Shaded colour (M, 3) in [0, 1] of surface points of ``prim`` (None: the room itself, whose face
        each point is on follows from its inward normal ``n``). ``key_idx`` is the points' class index."""
        vertical = np.abs(n[:, 2]) < 0.5
        if prim is not None:
            out = prim.look.albedo(u, v, su, sv, vertical)
        else:
            axis = np.argmax(np.abs(n), 1)
            face = 2 * axis + (n[np.arange(len(n)), axis] < 0)
            out = np.zeros((len(p), 3))
            for f in np.unique(face):
                sel = face == f
                out[sel] = self.looks[int(f)].albedo(u[sel], v[sel], su[sel], sv[sel], vertical[sel])
        return np.clip(out * self.shade(p, n)[:, None], 0, 1)


# ----------------------------------------------------------------------------- layout

Part = tuple  # (x, y, z0, sx, sy, sz[, role]) box or ("cyl", x, y, z0, r, h[, role]) in an object frame


def _box(key, x, y, z0, sx, sy, sz, yaw=0.0, **kw) -> Prim:
    return Prim(key, np.array([x, y, z0 + sz / 2]), np.array([sx / 2, sy / 2, sz / 2]), yaw, **kw)


def _cyl(key, x, y, z0, r, h, **kw) -> Prim:
    return Prim(key, np.array([x, y, z0 + h / 2]), np.array([r, r, h / 2]), radius=r, **kw)


def _local(parts: list[Part], cx, cy, yaw, key, looks: tuple[Look, Look], obj: int = -1) -> list[Prim]:
    """Prims of object ``obj``, given in its frame and rotated by yaw about (cx, cy). A part's role picks
    its look: 0 the object's main look, 1 its frame look (legs, frames, bases, handles)."""
    c, s = np.cos(yaw), np.sin(yaw)
    out = []
    for part in parts:
        if part[0] == "cyl":
            _, x, y, z0, r, h, *role = part
            look = looks[role[0] if role else 0]
            out.append(_cyl(key, cx + c * x - s * y, cy + s * x + c * y, z0, r, h, look=look, obj=obj))
        else:
            x, y, z0, sx, sy, sz, *role = part
            look = looks[role[0] if role else 0]
            out.append(_box(key, cx + c * x - s * y, cy + s * x + c * y, z0, sx, sy, sz, yaw, look=look, obj=obj))
    return out


def _legs(w: float, d: float, h: float, inset: float, rng) -> list[Part]:
    """Four legs (round or square) under a w x d top, height h."""
    if rng.uniform() < 0.5:
        r = rng.uniform(0.015, 0.035)
        return [("cyl", sx * (w / 2 - inset), sy * (d / 2 - inset), 0, r, h, 1) for sx in (-1, 1) for sy in (-1, 1)]
    a = rng.uniform(0.03, 0.06)
    return [(sx * (w / 2 - inset), sy * (d / 2 - inset), 0, a, a, h, 1) for sx in (-1, 1) for sy in (-1, 1)]


def _object(kind: str, rng: np.random.Generator) -> tuple[list[Part], float, float, str]:
    """(parts in the object frame with its back at y = +depth/2, width, depth, key)."""
    u = rng.uniform
    if kind == "bed":
        bw, bl, h, hb = u(0.9, 1.9), u(1.9, 2.2), u(0.35, 0.6), u(0.7, 1.2)
        if u() < 0.5:  # head against the wall
            return [(0, -0.04, 0, bw, bl - 0.08, h), (0, bl / 2 - 0.04, 0, bw, 0.08, hb, 1)], bw, bl, "bed"
        hb = min(hb, 0.95)  # along the wall, headboard at one end
        return [(-0.04, 0, 0, bl - 0.08, bw, h), (bl / 2 - 0.04, 0, 0, 0.08, bw, hb, 1)], bl, bw, "bed"
    if kind == "couch":
        w, d, h, back = u(1.2, 2.6), u(0.75, 1.0), u(0.38, 0.48), u(0.3, 0.45)
        parts = [(0, -0.05, 0, w - 0.3, d - 0.1, h), (0, d / 2 - 0.1, 0, w, 0.2, h + back)]
        if u() < 0.8:
            ah = h + u(0.1, 0.25)
            parts += [(sx * (w / 2 - 0.075), -0.05, 0, 0.15, d - 0.1, ah) for sx in (-1, 1)]
        else:
            parts[0] = (0, -0.05, 0, w, d - 0.1, h)
        return parts, w, d, "couch"
    if kind == "cabinet":
        w, d, h = u(0.4, 1.6), u(0.35, 0.65), u(0.5, 2.1)
        parts = [(0, 0, 0.06, w, d, h - 0.06), (0, 0.02, 0, w - 0.04, d - 0.04, 0.06, 1)]  # body on a plinth
        return parts, w, d, "cabinet"
    if kind == "nightstand":
        w, d = u(0.4, 0.6), u(0.35, 0.5)
        return [(0, 0, 0, w, d, u(0.45, 0.65))], w, d, "cabinet"
    if kind == "bookshelf":
        w, d, h = u(0.5, 1.6), u(0.25, 0.45), u(0.9, 2.2)
        n = int(np.clip(round(h / u(0.35, 0.5)), 2, 5))
        t = 0.025
        parts = [(0, d / 2 - 0.01, 0, w, 0.02, h, 1)]  # back
        parts += [(sx * (w / 2 - t / 2), 0, 0, t, d, h, 1) for sx in (-1, 1)]  # sides
        step = (h - t) / n
        for i in range(n):  # a board and a row of books on it
            z = i * step
            parts.append((0, 0, z, w - 2 * t, d, t, 1))
            bh, bd = (step - t) * u(0.55, 0.9), (d - 0.02) * u(0.6, 0.9)
            parts.append((0, d / 2 - 0.02 - bd / 2, z + t, w - 2 * t - 0.02, bd, bh))
        parts.append((0, 0, h - t, w - 2 * t, d, t, 1))  # top
        return parts, w, d, "bookshelf"
    if kind == "refrigerator":
        w, d, h = u(0.55, 0.9), u(0.6, 0.75), u(0.85, 2.0)
        hl = min(0.6, 0.4 * h)
        return (
            [(0, 0, 0, w, d - 0.03, h), (w / 2 - 0.08, -d / 2 + 0.015, h - hl - 0.15, 0.03, 0.03, hl, 1)],
            w,
            d,
            "refrigerator",
        )
    if kind == "desk":
        w, d, h = u(0.9, 1.9), u(0.5, 0.85), u(0.7, 0.78)
        parts = [(0, 0, h - 0.03, w, d, 0.03)]
        style = u()
        if style < 0.4:  # side panels
            parts += [(sx * (w / 2 - 0.02), 0, 0, 0.04, d, h - 0.03, 1) for sx in (-1, 1)]
        elif style < 0.7:  # legs
            parts += _legs(w, d, h - 0.03, 0.05, rng)
        else:  # a drawer block on one side, a panel on the other
            pw = u(0.35, 0.45)
            sx = 1 if u() < 0.5 else -1
            parts += [(sx * (w / 2 - pw / 2), 0, 0, pw, d - 0.02, h - 0.03)]
            parts += [(-sx * (w / 2 - 0.02), 0, 0, 0.04, d, h - 0.03, 1)]
        return parts, w, d, "desk"
    if kind == "trash can":
        if u() < 0.7:
            r = u(0.1, 0.25)
            return [("cyl", 0, 0, 0, r, u(0.25, 0.7))], 2 * r, 2 * r, "trash can"
        a, b = u(0.2, 0.4), u(0.2, 0.35)
        return [(0, 0, 0, a, b, u(0.25, 0.7))], a, b, "trash can"
    raise KeyError(kind)


def _chair(key: str, rng) -> list[Part]:
    """A chair facing -y (its back at +y): seat, back and legs or side frames (or an office chair).
    Everything stays under 1 m, so the camera path may pass over it."""
    s, h = rng.uniform(0.38, 0.55), rng.uniform(0.4, 0.5)
    back = rng.uniform(0.3, 0.97 - h)
    if key == "office chair":
        return [
            ("cyl", 0, 0, 0.05, 0.03, h - 0.11, 1),
            (0, 0, h - 0.06, s, s, 0.06),
            (0, s / 2 - 0.03, h, s, 0.05, min(back, 0.95 - h)),
            ("cyl", 0, 0, 0, rng.uniform(0.22, 0.3), 0.05, 1),
        ]
    seat = [(0, 0, h - 0.05, s, s, 0.05), (0, s / 2 - 0.025, h, s, 0.05, back)]
    if rng.uniform() < 0.5:
        return seat + [(sx * (s / 2 - 0.02), 0, 0, 0.04, s, h - 0.05, 1) for sx in (-1, 1)]
    return seat + _legs(s, s, h - 0.05, 0.03, rng)


def _table(key: str, rng) -> tuple[list[Part], float, float, list[tuple[float, float, float]]]:
    """(parts, width, depth, chair slots (x, y, angle of the chair's back) in the table frame)."""
    u = rng.uniform
    h = u(0.7, 0.78) if key == "table" else u(0.35, 0.5)
    if u() < 0.25:  # round: top, pedestal, foot
        r = u(0.4, 0.65) if key == "table" else u(0.3, 0.5)
        parts = [
            ("cyl", 0, 0, h - 0.04, r, 0.04),
            ("cyl", 0, 0, 0.03, u(0.04, 0.07), h - 0.07, 1),
            ("cyl", 0, 0, 0, u(0.18, 0.28), 0.03, 1),
        ]
        k = int(rng.integers(2, 6))
        a0 = u(0, 2 * np.pi)
        slots = [(-np.sin(a) * (r + 0.25), np.cos(a) * (r + 0.25), a) for a in a0 + 2 * np.pi * np.arange(k) / k]
        return parts, 2 * r, 2 * r, slots
    if key == "table":
        w, d = u(0.7, 2.0), u(0.6, 1.1)
    else:
        w, d = u(0.6, 1.3), u(0.4, 0.8)
    parts = [(0, 0, h - 0.04, w, d, 0.04)]
    if key == "table" or u() < 0.7:
        parts += _legs(w, d, h - 0.04, 0.06, rng)
    else:  # a solid block under the top
        parts.append((0, 0, 0, w - 0.1, d - 0.1, h - 0.04))
    slots = []
    for side, (ext, across) in enumerate(((w, d), (d, w), (w, d), (d, w))):
        ang = [0, np.pi / 2, np.pi, -np.pi / 2][side]  # the chair's back away from the table
        n = max(1, int(ext // 0.6))
        for j in range(n):
            off = (j + 0.5) * ext / n - ext / 2
            dist = across / 2 + 0.27
            # the chair's centre: ``dist`` along the direction the back faces, ``off`` along the side
            slots.append((-np.sin(ang) * dist + np.cos(ang) * off, np.cos(ang) * dist + np.sin(ang) * off, ang))
    return parts, w, d, slots


def _footprint(prims: list[Prim]) -> tuple[np.ndarray, np.ndarray]:
    c = np.concatenate([p.corners() for p in prims])
    return c.min(0), c.max(0)


def _free(lo, hi, taken, margin=0.1) -> bool:
    return all((hi[:2] + margin < a[:2]).any() or (lo[:2] - margin > b[:2]).any() for a, b in taken)


def _collide(a: Prim, b: Prim, eps: float = 0.002) -> bool:
    """Whether two prims overlap by more than ``eps`` (separating axes of the yawed rectangles, circles
    for cylinders, and the z intervals)."""
    if abs(a.center[2] - b.center[2]) >= a.half[2] + b.half[2] - 2 * eps:
        return False
    d = b.center[:2] - a.center[:2]
    if a.is_cyl and b.is_cyl:
        return bool(np.hypot(*d) < a.radius + b.radius - 2 * eps)
    if a.is_cyl or b.is_cyl:
        box, cyl, d = (b, a, -d) if a.is_cyl else (a, b, d)
        local = box.rot()[:2, :2].T @ d
        nearest = np.clip(local, -box.half[:2], box.half[:2])
        return bool(np.hypot(*(local - nearest)) < cyl.radius - 2 * eps)
    axes = [a.rot()[:2, 0], a.rot()[:2, 1], b.rot()[:2, 0], b.rot()[:2, 1]]
    for ax in axes:
        ra = sum(a.half[j] * abs(a.rot()[:2, j] @ ax) for j in range(2))
        rb = sum(b.half[j] * abs(b.rot()[:2, j] @ ax) for j in range(2))
        if abs(d @ ax) >= ra + rb - 2 * eps:
            return False
    return True


def _clear_of(new: list[Prim], old: list[Prim]) -> bool:
    return not any(_collide(a, b) for a in new for b in old)


def make_room(rng: np.random.Generator, seed: int = 0) -> Room:
    """One procedural room (deterministic in ``rng``); the camera path is checked separately.

    Every instance (each object, the walls, the floor, the ceiling) draws its look from the shared pool;
    the furniture varies in size, number and arrangement: some against the walls, some free-standing
    at any yaw, in groups (a desk and its chair, a couch and a coffee table, a table and its chairs)."""
    u = rng.uniform
    size = np.array([u(4.2, 7.2), u(3.8, 6.2), u(2.4, 3.1)])
    lx, ly, lz = size
    prims: list[Prim] = []
    taken: list[tuple] = []
    nseed = itertools.count(seed * 8000 + 8, 8)  # pattern seeds; a look also hashes with seed + 1..7
    nobj = itertools.count()

    def local(*args) -> list[Prim]:  # the prims of a new object
        return _local(*args, obj=next(nobj))

    def looks(role: str) -> tuple[Look, Look]:
        """An object's main look and its frame look (half the time the same)."""
        main = draw_look(role, rng, next(nseed))
        return main, (main if u() < 0.5 else draw_look("frame", rng, next(nseed)))

    wall_look, floor_look, ceiling_look = (draw_look(k, rng, next(nseed)) for k in ("wall", "floor", "ceiling"))
    room_looks = [wall_look] * 4 + [floor_look, ceiling_look]
    if u() < 0.25:  # an accent wall
        room_looks[int(rng.integers(0, 4))] = draw_look("wall", rng, next(nseed))

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

    def inside(lo, hi, m):
        return bool((lo[:2] >= m - 1e-9).all() and (hi[:2] <= size[:2] - m + 1e-9).all())

    def place(build, where: str, margin=0.1, tries=40, w=0.0, d=0.0):
        """Try ``build(cx, cy, yaw) -> prims`` at random frames until its footprint is free: ``where`` is
        "wall" (back against a wall, w x d object) or "free" (anywhere 0.3 m from the walls, any yaw).
        Adds the prims and returns (prims, (cx, cy, yaw, wall)), or None."""
        for _ in range(tries):
            if where == "wall":
                wall = int(rng.integers(0, 4))
                if wall_len(wall) < w + 0.3:
                    continue
                cx, cy, yaw = wall_frame(wall, u(0.1 + w / 2, wall_len(wall) - 0.1 - w / 2), d / 2 + 0.01)
                m = 0.0
            else:
                wall, cx, cy, yaw, m = -1, u(0.3, lx - 0.3), u(0.3, ly - 0.3), u(-np.pi, np.pi), 0.3
            obj = build(cx, cy, yaw)
            lo, hi = _footprint(obj)
            if inside(lo, hi, m) and _free(lo, hi, taken, margin):
                prims.extend(obj)
                taken.append((lo, hi))
                return obj, (cx, cy, yaw, wall)
        return None

    def simple(kind: str, where: str):
        parts, w, d, key = _object(kind, rng)
        lk = looks(key)
        return place(lambda cx, cy, yaw: local(parts, cx, cy, yaw, key, lk), where, w=w, d=d)

    # wall-mounted flat things (2 cm thick, 1 cm proud of the wall)
    flats = [("door", u(0.8, 1.0), 0.0, u(2.0, 2.2)) for _ in range(1 + int(u() < 0.3))]
    flats += [("window", u(0.6, 1.8), u(0.7, 1.1), None) for _ in range(rng.integers(0, 4))]
    flats += [("picture", u(0.3, 1.2), u(1.1, 1.7), None) for _ in range(rng.integers(0, 4))]
    wall_spans: list[tuple[int, float, float]] = []
    for key, w, z0, h in flats:
        for _ in range(40):
            wall = int(rng.integers(0, 4))
            if wall_len(wall) < w + 0.6:
                continue
            a = u(0.3 + w / 2, wall_len(wall) - 0.3 - w / 2)
            if all(wl != wall or abs(a - b) > (w + wb) / 2 + 0.2 for wl, b, wb in wall_spans):
                break
        else:
            continue
        wall_spans.append((wall, a, w))
        if h is None:
            h = min(u(0.8, 1.5), lz - 0.2 - z0) if key == "window" else min(w * u(0.5, 1.4), lz - 0.1 - z0)
        cx, cy, yaw = wall_frame(wall, a, 0.0)
        prims += local([(0, 0, z0, w, 0.02, h)], cx, cy, yaw, key, looks(key))
        if key == "window" and u() < 0.6:  # curtains beside it
            cw, top = u(0.3, 0.6), lz - u(0.05, 0.3)
            lk, z_c = looks("curtain"), u(0.02, 0.3)
            for side in (1, -1) if u() < 0.4 else (1 if u() < 0.5 else -1,):
                at = a + side * (w / 2 + cw / 2 + 0.05)
                if not cw / 2 + 0.05 < at < wall_len(wall) - cw / 2 - 0.05 or any(
                    wl == wall and abs(at - b) < (cw + wb) / 2 + 0.02 for wl, b, wb in wall_spans
                ):
                    continue
                wall_spans.append((wall, at, cw))
                cx2, cy2, _ = wall_frame(wall, at, 0.03)
                curtain = local([(0, 0, z_c, cw, 0.04, top - z_c)], cx2, cy2, yaw, "curtain", lk)
                prims += curtain
                taken.append(_footprint(curtain))
        if key == "door":  # keep the floor in front of the door free
            taken.append(_footprint(local([(0, -0.5, 0, w, 1.0, 0.1)], cx, cy, yaw, "door", (wall_look,) * 2)))

    # a bed against a wall, maybe with a nightstand beside its head
    if u() < 0.55:
        parts, w, d, key = _object("bed", rng)
        lk = looks("bed")
        got = place(lambda cx, cy, yaw: local(parts, cx, cy, yaw, key, lk), "wall", w=w, d=d)
        if got is not None and u() < 0.5:
            _, (cx, cy, yaw, wall) = got
            np_, nw, nd, nkey = _object("nightstand", rng)
            lk2 = looks("cabinet")
            along = cx if wall >= 2 else cy
            head_on_wall = w < d  # the head-against-the-wall variant is narrower than long
            for side in (1, -1):
                if head_on_wall:
                    at = along + side * (w / 2 + nw / 2 + 0.05)
                else:  # along the wall: beside the headboard end
                    end = along + (w / 2 if (wall in (0, 3)) else -w / 2)
                    at = end + (nw / 2 + 0.05) * (1 if (wall in (0, 3)) else -1)
                if not nw / 2 + 0.05 < at < wall_len(wall) - nw / 2 - 0.05:
                    continue
                fx, fy, fyaw = wall_frame(wall, at, nd / 2 + 0.01)
                obj = local(np_, fx, fy, fyaw, nkey, lk2)
                lo, hi = _footprint(obj)
                if _free(lo, hi, taken, 0.02):
                    prims.extend(obj)
                    taken.append((lo, hi))
                    break

    # tall storage against the walls
    tall = ["cabinet"] * int(rng.integers(0, 3)) + ["bookshelf"] * int(rng.integers(0, 3))
    tall += ["refrigerator"] * int(u() < 0.35)
    rng.shuffle(tall)
    for kind in tall:
        simple(kind, "wall")

    # desks (against a wall or free-standing), most with a chair in front
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        parts, w, d, key = _object("desk", rng)
        lk = looks("desk")
        chair = None
        if u() < 0.85:
            ckey = "office chair" if u() < 0.7 else "chair"
            chair = (ckey, _chair(ckey, rng), looks(ckey), u(-0.15, 0.25), u(-0.5, 0.5), u(-0.2, 0.2) * w)

        def desk(cx, cy, yaw, parts=parts, d=d, lk=lk, chair=chair):
            out = local(parts, cx, cy, yaw, "desk", lk)
            if chair is not None:
                ckey, cparts, clk, pull, turn, off = chair
                c, s = np.cos(yaw), np.sin(yaw)
                for back in (0.0, 0.15, 0.3):  # pulled out until it clears the desk's legs and panels
                    ox, oy = off, -d / 2 - 0.1 - pull - back
                    seat = local(cparts, cx + c * ox - s * oy, cy + s * ox + c * oy, yaw + np.pi + turn, ckey, clk)
                    if _clear_of(seat, out):
                        return out + seat
            return out

        place(desk, "wall" if u() < 0.7 else "free", w=w, d=d)

    # a couch (against a wall or free-standing), often with a coffee table in front of it
    if u() < 0.6:
        parts, w, d, key = _object("couch", rng)
        lk = looks(key)
        got = place(lambda cx, cy, yaw: local(parts, cx, cy, yaw, key, lk), "wall" if u() < 0.65 else "free", w=w, d=d)
        if got is not None and u() < 0.6:
            _, (cx, cy, yaw, _) = got
            parts, tw, td, _ = _table("coffee table", rng)
            lk = looks("coffee table")
            for gap in (0.45, 0.35):
                dist = d / 2 + gap + td / 2
                tx, ty = cx + np.sin(yaw) * dist, cy - np.cos(yaw) * dist
                table = local(parts, tx, ty, yaw, "coffee table", lk)
                lo, hi = _footprint(table)
                if inside(lo, hi, 0.05) and _free(lo, hi, taken, 0.1):
                    prims.extend(table)
                    taken.append((lo, hi))
                    break

    # 0-2 tables: dining tables with a varying number of chairs, or coffee tables
    for i in range(int(rng.choice([0, 1, 1, 2]))):
        key = "table" if u() < 0.65 else "coffee table"
        parts, tw, td, slots = _table(key, rng)
        lk = looks(key)
        others = list(taken)  # chairs may tuck under their table: test them against the rest
        if i == 0:  # near the middle
            got = None
            for _ in range(10):
                tx, ty, tyaw = lx / 2 + u(-0.6, 0.6), ly / 2 + u(-0.6, 0.6), u(-np.pi, np.pi)
                table = local(parts, tx, ty, tyaw, key, lk)
                lo, hi = _footprint(table)
                if inside(lo, hi, 0.3) and _free(lo, hi, taken):
                    prims.extend(table)
                    taken.append((lo, hi))
                    got = (table, (tx, ty, tyaw))
                    break
        else:
            got = place(lambda cx, cy, yaw: local(parts, cx, cy, yaw, key, lk), "free")
        if got is None or key != "table":
            continue
        table, (tx, ty, tyaw) = got[0], got[1][:3]
        ckey = "chair" if u() < 0.8 else "office chair"
        clk = looks(ckey)  # a set of chairs shares a look
        n = int(rng.integers(0, len(slots) + 1))
        c, s = np.cos(tyaw), np.sin(tyaw)
        for j in sorted(rng.permutation(len(slots))[:n]):
            sx, sy, ang = slots[j]
            pull = u(0.0, 0.2)
            sx, sy = sx - np.sin(ang) * pull, sy + np.cos(ang) * pull
            chair = local(
                _chair(ckey, rng), tx + c * sx - s * sy, ty + s * sx + c * sy, tyaw + ang + u(-0.2, 0.2), ckey, clk
            )
            lo, hi = _footprint(chair)
            if inside(lo, hi, 0.02) and _free(lo, hi, others, margin=0.02) and _clear_of(chair, table):
                prims += chair
                others.append((lo, hi))
                taken.append((lo, hi))

    # loose chairs and trash cans anywhere
    for _ in range(int(rng.integers(0, 3))):
        ckey = "chair" if u() < 0.6 else "office chair"
        cparts, clk = _chair(ckey, rng), looks(ckey)
        place(lambda cx, cy, yaw: local(cparts, cx, cy, yaw, ckey, clk), "free", margin=0.05)
    for _ in range(int(rng.integers(0, 3))):
        simple("trash can", "wall" if u() < 0.6 else "free")
    return Room(size, bool(u() < 0.75), prims, room_looks, seed)


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
