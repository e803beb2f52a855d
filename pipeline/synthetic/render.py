"""Rendering a synthetic room: exact ray casting of its primitives into depth, colour and labels."""

from __future__ import annotations

import numpy as np

from lift3d.pipeline.synthetic.rooms import KEY_INDEX, KEYS, Prim, Room

MAX_RANGE_M = 10.0
GRAZING_COS = 0.06  # depth sensors return nothing at grazing incidence


# ----------------------------------------------------------------------------- rendering


def _rect(prim: Prim, pose: np.ndarray, k, hw) -> tuple[int, int, int, int, float]:
    """The pixel rectangle (r0, r1, c0, c1) the prim can cover (the whole image if it straddles the
    camera) and the smallest camera depth of its bounding box."""
    h, w = hw
    pc = (prim.corners() - pose[:3, 3]) @ pose[:3, :3]
    zmin = float(pc[:, 2].min())
    if (pc[:, 2] <= 0).all():
        return 0, 0, 0, 0, zmin
    if zmin < 0.05:
        return 0, h, 0, w, zmin
    cols = k[0] * pc[:, 0] / pc[:, 2] + k[2]
    rows = k[1] * pc[:, 1] / pc[:, 2] + k[3]
    c0, c1 = max(0, int(np.floor(cols.min())) - 1), min(w, int(np.ceil(cols.max())) + 2)
    r0, r1 = max(0, int(np.floor(rows.min())) - 1), min(h, int(np.ceil(rows.max())) + 2)
    return (r0, r1, c0, c1, zmin) if r0 < r1 and c0 < c1 else (0, 0, 0, 0, zmin)


def _cast(room: Room, pose: np.ndarray, k, hw):
    """The ray cast behind :func:`raycast`, plus the hit pixels grouped by owner: (t, owner, face,
    dirs, hits (flat pixel indices sorted by owner), owner ids, group starts, group ends)."""
    h, w = hw
    rows, cols = np.mgrid[0:h, 0:w]
    d_cam = np.stack([(cols - k[2]) / k[0], (rows - k[3]) / k[1], np.ones((h, w))], -1)
    dirs = d_cam @ pose[:3, :3].T  # unit camera z: the ray parameter is the depth z
    # the prims are tested in float32 (about 1e-6 m at 10 m); depths stay float64
    dx, dy, dz = (np.ascontiguousarray(dirs[..., j], np.float32) for j in range(3))
    o = pose[:3, 3]
    t, face = room.intersect_room(o, dirs.reshape(-1, 3))
    t, face = t.reshape(h, w), face.reshape(h, w)
    owner = np.full((h, w), -1, np.int64)
    rects = [_rect(p, pose, k, hw) for p in room.prims]
    for i in sorted(range(len(rects)), key=lambda j: (rects[j][4], j)):
        r0, r1, c0, c1, zmin = rects[i]
        if r0 == r1:
            continue
        win = (slice(r0, r1), slice(c0, c1))
        tw = t[win]
        cand = tw > zmin  # elsewhere something nearer than any point of this prim was hit
        n = np.count_nonzero(cand)
        if n == 0:
            continue
        if n == cand.size:
            tp, _ = room.prims[i].intersect(o, dx[win], dy[win], dz[win], with_face=False)
            better = tp < tw
            tw[better] = tp[better]
            owner[win][better] = i
        else:
            rr, cc = np.nonzero(cand)
            rr, cc = rr + r0, cc + c0
            tp, _ = room.prims[i].intersect(o, dx[rr, cc], dy[rr, cc], dz[rr, cc], with_face=False)
            better = tp < t[rr, cc]
            rr, cc = rr[better], cc[better]
            t[rr, cc] = tp[better]
            owner[rr, cc] = i
    hits = np.flatnonzero(np.isfinite(t))
    own = owner.ravel()[hits]
    order = np.argsort(own, kind="stable")  # group the hits by owner: contiguous slices
    hits, own = hits[order], own[order]
    ids, starts = np.unique(own, return_index=True)
    ends = np.append(starts[1:], len(own))
    ff = face.reshape(-1)
    for i, a, b in zip(ids, starts, ends):
        if i >= 0:
            sel = hits[a:b]
            _, ff[sel] = room.prims[i].intersect(o, dx.ravel()[sel], dy.ravel()[sel], dz.ravel()[sel])
    return t, owner, face, dirs, hits, ids, starts, ends


def raycast(room: Room, pose: np.ndarray, k, hw):
    """Per pixel: z depth (m, inf = miss), hit owner (-1 room, else prim index), face, ray dirs.

    Prims are tested front to back (by the nearest depth of their bounding box), and only on the
    rays of their rectangle that nothing nearer than that depth has hit yet (the ray parameter is
    the camera depth); faces are computed once, for the rays each prim owns in the end."""
    return _cast(room, pose, k, hw)[:4]


def _key_of_room_face(face: np.ndarray) -> np.ndarray:
    return np.where(face == 4, KEY_INDEX["floor"], np.where(face == 5, KEY_INDEX["ceiling"], KEY_INDEX["wall"]))


def render_full(room: Room, pose: np.ndarray, k, hw, with_rgb: bool = True):
    """Ray-cast one view: (rgb uint8 or None, z metres (0 = miss), class index per pixel
    (len(KEYS) = miss), cosine of incidence). k = (fx, fy, cx, cy)."""
    t, _, face, dirs, hi, ids, starts, ends = _cast(room, pose, k, hw)
    h, w = hw
    hit = np.isfinite(t)
    fc = face.ravel()[hi]
    d = dirs.reshape(-1, 3)[hi]
    p = pose[:3, 3] + d * t.ravel()[hi][:, None]
    keys = np.zeros(len(hi), np.int64)
    nrm = np.zeros((len(hi), 3))
    col = np.zeros((len(hi), 3))
    for i, a, b in zip(ids, starts, ends):
        s = slice(a, b)
        prim = room.prims[i] if i >= 0 else None
        if prim is None:
            ki = _key_of_room_face(fc[s])
            if with_rgb:
                u, v, su, sv, n = room.room_surface(fc[s], p[s])
            else:
                n = room.room_normal(fc[s])
        else:
            ki = np.full(b - a, KEY_INDEX[prim.key])
            if with_rgb:
                u, v, su, sv, n = prim.surface(fc[s], p[s])
            else:
                n = prim.normal(fc[s], p[s])
        keys[s], nrm[s] = ki, n
        if with_rgb:
            col[s] = room.colour(ki, prim, u, v, su, sv, n, p[s])
    key_idx = np.full(h * w, len(KEYS), np.int64)
    key_idx[hi] = keys
    cos = np.zeros(h * w)
    cos[hi] = np.abs(np.einsum("ij,ij->i", nrm, d)) / np.sqrt(np.einsum("ij,ij->i", d, d))
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
