"""The embedded default dataset: procedural indoor rooms written in ScanNet's raw format.

``generate(out, scenes, seed)`` builds rooms (floor, walls, ceiling, furniture-like boxes of
several NYU40 classes, each class with its own texture), renders a camera trajectory per room
by ray casting against axis-aligned boxes, and writes, under ``out/``:

- ``scans/<scene>/<scene>.sens`` (version 4; JPEG colour at twice the depth resolution, zlib
  uint16 depth in mm, depth shift 1000, colour and depth intrinsics, camera-to-world poses in
  ScanNet's convention; a few poses are -inf, as in real ScanNet),
- ``scans/<scene>/<scene>_vh_clean_2.ply`` and ``<scene>_vh_clean_2.labels.ply`` (binary PLY,
  vertex colours; vertex ``label`` = NYU40 id), in the ``.sens`` pose frame (world z up),
- ``scans/<scene>/<scene>_2d-label-filt.zip`` with ``label-filt/<frame>.png`` (16-bit, ScanNet
  label ids at colour resolution), ``scannetv2-labels.combined.tsv`` mapping them to NYU40,
- ``scannetv2_train.txt`` / ``scannetv2_val.txt``.

A ``kind: synthetic`` dataset generates into ``<workdir>/raw/synthetic`` once and is then read
by the unchanged ScanNet reader, so the demo runs the real ScanNet code path.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline import scannet

# (name, ScanNet label id, NYU40 id, NYU40 class) for the categories the generator uses
CATEGORIES = [
    ("wall", 1, 1, "wall"), ("chair", 2, 5, "chair"), ("floor", 3, 2, "floor"), ("table", 4, 7, "table"),
    ("door", 5, 8, "door"), ("couch", 6, 6, "sofa"), ("cabinet", 7, 3, "cabinet"), ("bed", 11, 4, "bed"),
    ("bookshelf", 13, 10, "bookshelf"), ("ceiling", 41, 22, "ceiling"),
]
NYU = {name: nyu for name, _, nyu, _ in CATEGORIES}
SCANNET_ID = {name: sid for name, sid, _, _ in CATEGORIES}
FURNITURE = {  # name: (size ranges x, y, z in metres)
    "bed": ((1.4, 2.0), (1.9, 2.1), (0.45, 0.6)), "table": ((0.8, 1.4), (0.6, 1.0), (0.7, 0.78)),
    "cabinet": ((0.5, 1.0), (0.4, 0.6), (0.8, 1.8)), "couch": ((1.5, 2.2), (0.8, 1.0), (0.7, 0.9)),
    "chair": ((0.45, 0.55), (0.45, 0.55), (0.8, 1.0)), "bookshelf": ((0.8, 1.2), (0.3, 0.4), (1.6, 2.0)),
}
DEFAULTS = {"depth_size": [120, 160], "frames_per_scene": 60, "jpeg_quality": 92}
VERSION = 1  # bump when the generator's output changes


@dataclass
class Box:
    lo: np.ndarray
    hi: np.ndarray
    name: str
    interior: bool = False   # the room: rays start inside and hit its inner faces


def _texture(name: str, p: np.ndarray, n: np.ndarray, rs: int) -> np.ndarray:
    """Per-class procedural colour (float 0..1, (M, 3)) at world points p with normals n."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    # tangent coordinates on the face: the two axes other than the normal's
    ax = np.argmax(np.abs(n), axis=1)
    u = np.where(ax == 0, y, x)
    v = np.where(ax == 2, y, z)
    h = np.sin(u * 12.9898 + v * 78.233 + rs) * 43758.5453
    noise = (h - np.floor(h))[:, None]
    if name == "floor":      # wooden planks
        plank = np.floor(u / 0.2)
        grain = 0.5 + 0.5 * np.sin(v * 40 + plank * 3.1 + np.sin(u * 7) * 2)
        base = np.array([0.55, 0.36, 0.2]) + 0.12 * grain[:, None] - 0.08 * (np.mod(u, 0.2) < 0.01)[:, None]
    elif name == "wall":     # light paint, faint vertical roller marks
        base = np.array([0.85, 0.83, 0.76]) + 0.03 * np.sin(u * 30)[:, None]
    elif name == "ceiling":
        base = np.array([0.95, 0.95, 0.95]) + 0 * u[:, None]
    elif name == "bed":      # blue/white checker
        c = (np.floor(u / 0.15) + np.floor(v / 0.15)) % 2
        base = np.where(c[:, None] > 0, [0.9, 0.9, 0.95], [0.15, 0.25, 0.7])
    elif name == "table":    # dark wood rings
        r = np.sqrt((u * 3) ** 2 + (v * 0.5) ** 2) * 25
        base = np.array([0.3, 0.17, 0.08]) + 0.1 * np.sin(r)[:, None]
    elif name == "cabinet":  # vertical white/grey stripes with handles
        s = np.mod(u, 0.25) < 0.02
        base = np.where(s[:, None], [0.35, 0.35, 0.38], [0.92, 0.9, 0.86])
    elif name == "couch":    # red fabric
        weave = 0.5 + 0.5 * np.sin(u * 90) * np.sin(v * 90)
        base = np.array([0.7, 0.1, 0.1]) + 0.1 * weave[:, None]
    elif name == "chair":    # green with dots
        d = (np.mod(u, 0.08) - 0.04) ** 2 + (np.mod(v, 0.08) - 0.04) ** 2 < 0.0004
        base = np.where(d[:, None], [0.95, 0.95, 0.3], [0.1, 0.55, 0.2])
    elif name == "bookshelf":  # colourful book spines
        k = np.floor(u / 0.04)
        hk = np.sin(k * 91.7 + np.floor(v / 0.35) * 13.1) * 1e4
        hue = (hk - np.floor(hk))
        base = np.stack([0.5 + 0.45 * np.sin(hue * 6.28), 0.5 + 0.45 * np.sin(hue * 6.28 + 2.1),
                         0.5 + 0.45 * np.sin(hue * 6.28 + 4.2)], 1)
    elif name == "door":     # brown with panel grooves
        g = (np.abs(np.mod(v, 0.5) - 0.25) < 0.01) | (np.abs(np.mod(u, 0.45) - 0.22) < 0.01)
        base = np.where(g[:, None], [0.25, 0.15, 0.08], [0.5, 0.32, 0.18])
    else:
        raise KeyError(name)
    return np.clip(base + 0.06 * (noise - 0.5), 0, 1)


def _shade(n: np.ndarray) -> np.ndarray:
    light = np.array([0.3, 0.5, 0.81])
    return (0.65 + 0.35 * np.abs(n @ light))[:, None]


def make_room(rng: np.random.Generator) -> list[Box]:
    lx, ly, lz = rng.uniform(4.0, 6.0), rng.uniform(4.0, 6.0), 2.6
    boxes = [Box(np.zeros(3), np.array([lx, ly, lz]), "room", interior=True)]
    # a door on the wall y = ly: a thin box 2 cm into the room
    dx = rng.uniform(0.5, lx - 1.5)
    boxes.append(Box(np.array([dx, ly - 0.02, 0.0]), np.array([dx + 0.9, ly, 2.05]), "door"))
    names = list(FURNITURE)
    rng.shuffle(names)
    placed: list[Box] = []
    for name in names[: int(rng.integers(4, 7))]:
        sx, sy, sz = (rng.uniform(*r) for r in FURNITURE[name])
        for _ in range(30):  # rejection-sample a free spot, against the walls or free
            x0, y0 = rng.uniform(0.05, lx - sx - 0.05), rng.uniform(0.05, ly - sy - 0.3)
            b = Box(np.array([x0, y0, 0.0]), np.array([x0 + sx, y0 + sy, sz]), name)
            if all((b.hi[:2] < o.lo[:2] - 0.3).any() or (b.lo[:2] > o.hi[:2] + 0.3).any() for o in placed):
                placed.append(b)
                break
    return boxes + placed


def raycast(boxes: list[Box], origin: np.ndarray, dirs: np.ndarray):
    """Nearest hit along each ray: (t, box index, normal). dirs (M, 3), not necessarily unit."""
    m = dirs.shape[0]
    best_t = np.full(m, np.inf)
    best_b = np.full(m, -1, np.int64)
    best_axis = np.zeros(m, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
    for bi, b in enumerate(boxes):
        t1 = (b.lo - origin) * inv
        t2 = (b.hi - origin) * inv
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        if b.interior:
            t = tmax.min(1)
            axis = tmax.argmin(1)
            ok = t > 0
        else:
            t = tmin.max(1)
            axis = tmin.argmax(1)
            ok = (t <= tmax.min(1)) & (t > 1e-6)
        upd = ok & (t < best_t)
        best_t[upd], best_b[upd], best_axis[upd] = t[upd], bi, axis[upd]
    normal = np.zeros((m, 3))
    normal[np.arange(m), best_axis] = 1.0
    return best_t, best_b, normal


def box_name(boxes: list[Box], bi: np.ndarray, p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Class name per hit: the room's faces are floor / ceiling / wall by the normal and height."""
    names = np.array([b.name for b in boxes], dtype=object)[bi]
    room = names == "room"
    horizontal = n[:, 2] > 0.5
    names[room & horizontal & (p[:, 2] < 0.01)] = "floor"
    names[room & horizontal & (p[:, 2] >= 0.01)] = "ceiling"
    names[room & ~horizontal] = "wall"
    return names


def render(boxes: list[Box], pose: np.ndarray, k: np.ndarray, hw: tuple[int, int], rs: int):
    """Ray-cast one view: (rgb uint8, z metres, class names) with k = (fx, fy, cx, cy)."""
    h, w = hw
    rows, cols = np.mgrid[0:h, 0:w]
    d_cam = np.stack([(cols.ravel() - k[2]) / k[0], (rows.ravel() - k[3]) / k[1], np.ones(h * w)], 1)
    dirs = d_cam @ pose[:3, :3].T
    t, bi, n = raycast(boxes, pose[:3, 3], dirs)
    p = pose[:3, 3] + dirs * t[:, None]
    names = box_name(boxes, bi, p, n)
    rgb = np.zeros((h * w, 3))
    for name in np.unique(names):
        sel = names == name
        rgb[sel] = _texture(name, p[sel], n[sel], rs) * _shade(n[sel])
    z = t  # d_cam has unit z: the ray parameter is the camera z
    return (rgb.reshape(h, w, 3) * 255).round().astype(np.uint8), z.reshape(h, w), names.reshape(h, w)


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose, OpenCV camera (x right, y down, z forward), world z up."""
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, fwd, eye
    return pose


def trajectory(boxes: list[Box], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    hi = boxes[0].hi
    c = hi / 2
    phase = rng.uniform(0, 2 * np.pi)
    poses = []
    for i in range(n):
        a = phase + 2 * np.pi * i / n
        eye = np.array([c[0] + 0.25 * hi[0] * np.cos(a), c[1] + 0.25 * hi[1] * np.sin(a), 1.4 + 0.1 * np.sin(3 * a)])
        look = a + np.pi + 0.6 * np.sin(2 * a)  # look across the room, sweeping
        target = eye + np.array([np.cos(look), np.sin(look), -0.45])
        poses.append(look_at(eye, target))
    return poses


def box_mesh(b: Box, names_fn, spacing: float = 0.1):
    """Vertices (V,3), faces (F,3), class name per vertex for a box's six faces, gridded."""
    verts, faces, normals = [], [], []
    for axis in range(3):
        for side in (0, 1):
            u_ax, v_ax = [a for a in range(3) if a != axis]
            nu = max(2, int(np.ceil((b.hi[u_ax] - b.lo[u_ax]) / spacing)) + 1)
            nv = max(2, int(np.ceil((b.hi[v_ax] - b.lo[v_ax]) / spacing)) + 1)
            uu, vv = np.meshgrid(np.linspace(b.lo[u_ax], b.hi[u_ax], nu), np.linspace(b.lo[v_ax], b.hi[v_ax], nv),
                                 indexing="ij")
            v = np.zeros((nu * nv, 3))
            v[:, axis] = b.hi[axis] if side else b.lo[axis]
            v[:, u_ax], v[:, v_ax] = uu.ravel(), vv.ravel()
            base = sum(len(x) for x in verts)
            idx = np.arange(nu * nv).reshape(nu, nv) + base
            a, bb, c, d = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
            f = np.concatenate([np.stack([a, bb, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
            nrm = np.zeros((nu * nv, 3))
            nrm[:, axis] = 1.0
            verts.append(v), faces.append(f), normals.append(nrm)
    v, n = np.concatenate(verts), np.concatenate(normals)
    return v, np.concatenate(faces), names_fn(v, n)


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, label: np.ndarray | None) -> None:
    """Binary little-endian PLY as ScanNet ships it (vertex x y z, red green blue alpha[, label])."""
    props = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    if label is not None:
        props.append(("label", "<u2"))
    vert = np.zeros(len(xyz), dtype=props)
    vert["x"], vert["y"], vert["z"] = xyz.T
    vert["red"], vert["green"], vert["blue"] = rgb.T
    vert["alpha"] = 255
    if label is not None:
        vert["label"] = label
    ply_t = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    head = ["ply", "format binary_little_endian 1.0", f"element vertex {len(xyz)}"]
    head += [f"property {ply_t[t]} {name}" for name, t in props]
    head += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    face = np.zeros(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"], face["i"] = 3, faces
    with open(path, "wb") as f:
        f.write(("\n".join(head) + "\n").encode())
        f.write(vert.tobytes())
        f.write(face.tobytes())


def write_sens(path: Path, color_k: np.ndarray, depth_k: np.ndarray, color_hw, depth_hw,
               frames: list[tuple[np.ndarray, bytes, bytes]]) -> None:
    """Write a version-4 .sens: frames are (pose 4x4, jpeg bytes, zlib depth bytes)."""
    def k44(k):
        m = np.eye(4, dtype=np.float32)
        m[0, 0], m[1, 1], m[0, 2], m[1, 2] = k
        return m

    name = b"lift3d-synthetic"
    with open(path, "wb") as f:
        f.write(struct.pack("<IQ", 4, len(name)) + name)
        for m in (k44(color_k), np.eye(4), k44(depth_k), np.eye(4)):
            f.write(np.asarray(m, "<f4").tobytes())
        f.write(struct.pack("<iiIIIIfQ", 2, 1, color_hw[1], color_hw[0], depth_hw[1], depth_hw[0], 1000.0, len(frames)))
        for i, (pose, cb, db) in enumerate(frames):
            f.write(np.asarray(pose, "<f4").tobytes())
            f.write(struct.pack("<QQQQ", i * 33333, i * 33333, len(cb), len(db)))
            f.write(cb)
            f.write(db)


def generate_scene(out: Path, scene: str, seed: int, depth_hw=(120, 160), n_frames: int = 60,
                   jpeg_quality: int = 92) -> None:
    rng = np.random.default_rng(seed)
    boxes = make_room(rng)
    dh, dw = depth_hw
    ch, cw = 2 * dh, 2 * dw
    depth_k = np.array([0.8 * dw, 0.8 * dw, (dw - 1) / 2, (dh - 1) / 2])
    color_k = scannet.scale_intrinsics(*depth_k, (dh, dw), (ch, cw)).astype(np.float64)
    sdir = out / "scans" / scene
    sdir.mkdir(parents=True, exist_ok=True)
    frames, labels = [], {}
    for i, pose in enumerate(trajectory(boxes, n_frames, rng)):
        rgb, _, names_c = render(boxes, pose, color_k, (ch, cw), seed)
        _, z, _ = render(boxes, pose, depth_k, (dh, dw), seed)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        depth_mm = np.clip(np.rint(z * 1000), 0, 65535).astype("<u2")
        depth_mm[z > 10] = 0  # beyond the sensor's range: no measurement
        stored_pose = pose.copy()
        if i % 40 == 20:  # tracking lost, as in real ScanNet
            stored_pose[:] = -np.inf
        frames.append((stored_pose, jpg.tobytes(), zlib.compress(depth_mm.tobytes(), 6)))
        lab = np.vectorize(SCANNET_ID.get, otypes=[np.uint16])(names_c)
        ok, png = cv2.imencode(".png", lab)
        labels[f"label-filt/{i}.png"] = png.tobytes()
    write_sens(sdir / f"{scene}.sens", color_k, depth_k, (ch, cw), (dh, dw), frames)
    # labelled mesh: every box's faces, the room split into floor / walls / ceiling
    vs, fs, ns, off = [], [], [], 0
    for b in boxes:
        v, f, nm = box_mesh(b, lambda v, n, b=b: box_name([b], np.zeros(len(v), int), v, n))
        if not b.interior:  # drop the hidden bottom face points of furniture? keep all: a real scan has no bottoms
            keep = v[:, 2] > 1e-6
            remap = -np.ones(len(v), np.int64)
            remap[keep] = np.arange(keep.sum())
            f = remap[f]
            f = f[(f >= 0).all(1)]
            v, nm = v[keep], nm[keep]
        vs.append(v), fs.append(f + off), ns.append(nm)
        off += len(v)
    xyz, faces, names = np.concatenate(vs), np.concatenate(fs), np.concatenate(ns)
    col = np.zeros((len(xyz), 3))
    for name in np.unique(names):
        sel = names == name
        nrm = np.tile([0, 0, 1.0], (sel.sum(), 1))
        col[sel] = _texture(name, xyz[sel], nrm, seed)
    rgb8 = (col * 255).round().astype(np.uint8)
    nyu = np.vectorize(NYU.get, otypes=[np.uint16])(names)
    write_ply(sdir / f"{scene}_vh_clean_2.ply", xyz.astype(np.float32), rgb8, faces, None)
    write_ply(sdir / f"{scene}_vh_clean_2.labels.ply", xyz.astype(np.float32), rgb8, faces, nyu)
    with zipfile.ZipFile(sdir / f"{scene}_2d-label-filt.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, data in labels.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, data)


def write_tsv(path: Path) -> None:
    rows = ["id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class"]
    for name, sid, nyu, nyu_name in CATEGORIES:
        rows.append(f"{sid}\t{name}\t{name}\t1\t{nyu}\t0\t{nyu_name}\t{nyu_name}")
    path.write_text("\n".join(rows) + "\n")


def generate(out, scenes: int = 6, seed: int = 0, depth_size=None, frames_per_scene: int | None = None,
             jpeg_quality: int | None = None) -> Path:
    """Write ``scenes`` rooms to ``out`` (deterministic in ``seed``); returns ``out``."""
    out = Path(out)
    depth_hw = tuple(depth_size or DEFAULTS["depth_size"])
    n_frames = frames_per_scene or DEFAULTS["frames_per_scene"]
    q = jpeg_quality or DEFAULTS["jpeg_quality"]
    out.mkdir(parents=True, exist_ok=True)
    names = [f"scene{i:04d}_00" for i in range(scenes)]
    for i, scene in enumerate(names):
        generate_scene(out, scene, seed * 1000 + i, depth_hw, n_frames, q)
    write_tsv(out / "scannetv2-labels.combined.tsv")
    n_val = max(1, scenes // 3) if scenes > 1 else 0
    (out / "scannetv2_train.txt").write_text("\n".join(names[: scenes - n_val]) + "\n")
    (out / "scannetv2_val.txt").write_text("\n".join(names[scenes - n_val:]) + "\n")
    return out


class Reader(scannet.Reader):
    """``kind: synthetic``: generate into <workdir>/raw/<name> once (again if its options change), then read it as ScanNet."""

    kind = "synthetic"
    extra_keys = {"scenes": int, "seed": int, "frames_per_scene": int, "depth_size": list}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        self.options = {"scenes": int(entry.get("scenes", 6)), "seed": int(entry.get("seed", 0)),
                        "frames_per_scene": int(entry.get("frames_per_scene", DEFAULTS["frames_per_scene"])),
                        "depth_size": list(entry.get("depth_size") or DEFAULTS["depth_size"]), "version": VERSION}
        self.root = Path(entry["root"]) if entry.get("root") else Path(workdir) / "raw" / entry["name"]

    def prepare(self) -> None:
        marker = self.root / "COMPLETE.json"
        if marker.is_file() and json.loads(marker.read_text()) == self.options:
            return
        tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        o = self.options
        generate(tmp, o["scenes"], o["seed"], o["depth_size"], o["frames_per_scene"])
        (tmp / "COMPLETE.json").write_text(json.dumps(o, sort_keys=True))
        shutil.rmtree(self.root, ignore_errors=True)
        tmp.rename(self.root)  # a killed generation never leaves a half-written dataset in place

    def scenes(self) -> list[str]:
        if not (self.root / "COMPLETE.json").is_file():
            self.prepare()
        return super().scenes()
