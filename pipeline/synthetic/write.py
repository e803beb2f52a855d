"""Writing synthetic rooms in ScanNet's raw format: meshes, .sens files, 2D labels, splits."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np

from lift3d.pipeline.readers.scannet_sens import intrinsics44
from lift3d.pipeline.readers.scannet_sens import write_sens as _write_sens
from lift3d.pipeline.synthetic.render import GRAZING_COS, MAX_RANGE_M, _key_of_room_face, render_full
from lift3d.pipeline.synthetic.rooms import (
    CLASSES,
    KEY_INDEX,
    NYU40_ID,
    SCANNET_ID,
    Prim,
    Room,
    _hash01,
    make_room,
    trajectory,
)

TSV_COLUMNS = [
    "id",
    "raw_category",
    "category",
    "count",
    "nyu40id",
    "eigen13id",
    "nyuClass",
    "nyu40class",
    "eigen13class",
    "ModelNet40",
    "ModelNet10",
    "ShapeNetCore55",
    "synsetoffset",
    "wnsynsetid",
    "wnsynsetkey",
    "mpcat40",
    "mpcat40index",
]

DEFAULTS = {"depth_size": [120, 160], "frames_per_scene": 60, "jpeg_quality": 92, "mesh_spacing": 0.05}
VERSION = 3  # bump when the generator's output changes (invalidates prepared copies)
LOST_TRACKING = (40, 20)  # frames with i % 40 == 20 get a -inf pose


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
    walls = [
        (0, np.array([0, 0, 0.0]), 1, 2, ly, lz),
        (1, np.array([lx, 0, 0.0]), 1, 2, ly, lz),
        (2, np.array([0, 0, 0.0]), 0, 2, lx, lz),
        (3, np.array([0, ly, 0.0]), 0, 2, lx, lz),
        (4, np.array([0, 0, 0.0]), 0, 1, lx, ly),
    ]
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
        vals = {
            "id": sid,
            "raw_category": raw,
            "category": raw,
            "count": 1,
            "nyu40id": nyu,
            "nyuClass": nyu_name,
            "nyu40class": nyu_name,
        }
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


def generate_scene(
    out: Path,
    scene: str,
    scene_seed: int,
    index: int,
    depth_hw=(120, 160),
    n_frames: int = 60,
    jpeg_quality: int = 92,
    mesh_spacing: float = 0.05,
) -> dict:
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
    empty_at = 35 if index % 2 == 1 else -1  # one sensor dropout in odd scenes (if that long)
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


def room_seed(seed: int, index: int) -> int:
    """The seed a dataset's room ``index`` (scene ``scene<index:04d>_00``) is drawn from: a room
    depends on it alone, so two datasets share a room exactly when they share a room seed."""
    return int(seed) * 100003 + int(index)


def split_of(scenes: int) -> tuple[list[str], list[str]]:
    """(train, val) scene ids: the last third (at least one, if there are two or more) is val."""
    names = [f"scene{i:04d}_00" for i in range(scenes)]
    n_val = max(1, scenes // 3) if scenes > 1 else 0
    return names[: scenes - n_val], names[scenes - n_val :]


def generate(
    out,
    scenes: int = 6,
    seed: int = 0,
    depth_size=None,
    frames_per_scene: int | None = None,
    jpeg_quality: int | None = None,
    mesh_spacing: float | None = None,
) -> Path:
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
        generate_scene(out, scene, room_seed(seed, i), i, depth_hw, n_frames, q, spacing)
    write_tsv(out / "scannetv2-labels.combined.tsv")
    (out / "scannetv2_train.txt").write_text("".join(s + "\n" for s in train))
    (out / "scannetv2_val.txt").write_text("".join(s + "\n" for s in val))
    return out
