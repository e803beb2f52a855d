"""The synthetic generator: deterministic, in ScanNet's formats, geometrically consistent, with appearance
from one pool shared by all classes (colour does not name the class) and varied, collision-free layouts.

The checks parse the files independently of the generator's writers (PLY header and .sens header
with tests/fixtures' own parsers, the tsv by columns) and compare with
lift3d.pipeline.readers.scannet_labels.
"""

import struct
import zipfile
import zlib
from collections import Counter, defaultdict

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, Skip
from lift3d.pipeline.readers.scannet import Reader
from lift3d.pipeline.readers.scannet_labels import (
    nyu40_to_scannet20,
    read_2d_labels,
    read_label_tsv,
    read_labelled_mesh,
)
from lift3d.pipeline.synthetic import generate
from lift3d.pipeline.synthetic.rooms import CLASSES, MATERIALS, make_room, trajectory
from lift3d.pipeline.synthetic.write import room_seed
from tests.fixtures.ply import parse_ply as parse_ply_file
from tests.fixtures.scannet_bytes import FRAME_TAIL, header_size, read_header

OPTS = dict(scenes=1, seed=0, frames_per_scene=6)
SCENE = "scene0000_00"


def parse_ply(path):
    """Binary little-endian PLY vertices, parsed from the header independently of the writer."""
    return parse_ply_file(path, fmt="binary_little_endian")


def sens_colour_k(path):
    """(fx, fy, cx, cy) of the colour camera, from the .sens header bytes."""
    header = read_header(path.read_bytes())
    assert header["version"] == 4
    k = header["colour_k"]
    return float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])


def tsv_columns(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    col = {name: i for i, name in enumerate(rows[0])}
    return {int(r[col["id"]]): int(r[col["nyu40id"]]) for r in rows[1:]}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "a", **OPTS)


def reader(out):
    return Reader({"name": "s", "kind": "scannet", "root": str(out), "split": "all"}, out)


def test_same_seed_same_bytes(out, tmp_path):
    again = generate(tmp_path / "b", **OPTS)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.relative_to(out).as_posix() for p in files}
    assert {
        f"scans/{SCENE}/{SCENE}{s}"
        for s in (".sens", "_vh_clean_2.ply", "_vh_clean_2.labels.ply", "_2d-label-filt.zip")
    } <= names
    assert {"scannetv2-labels.combined.tsv", "scannetv2_train.txt", "scannetv2_val.txt"} <= names
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == [p.relative_to(out) for p in files]
    for f in files:
        assert f.read_bytes() == (again / f.relative_to(out)).read_bytes(), f.name


def test_labelled_mesh_and_2d_labels_are_readable_and_mapped(out):
    d = out / "scans" / SCENE
    xyz, rgb, nyu = read_labelled_mesh(d)
    mesh, labels = parse_ply(d / f"{SCENE}_vh_clean_2.ply"), parse_ply(d / f"{SCENE}_vh_clean_2.labels.ply")
    np.testing.assert_array_equal(xyz, np.stack([mesh["x"], mesh["y"], mesh["z"]], 1))
    np.testing.assert_array_equal(rgb, np.stack([mesh["red"], mesh["green"], mesh["blue"]], 1))
    np.testing.assert_array_equal(nyu, labels["label"].astype(np.int64))
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8 and nyu.dtype == np.int64
    assert {1, 2} <= set(nyu.tolist()) <= set(range(1, 41))  # wall and floor at least
    bench = nyu40_to_scannet20(nyu)
    assert (
        (bench == 255) == ~np.isin(nyu, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39])
    ).all()
    assert (bench[nyu == 1] == 0).all() and (bench[nyu == 2] == 1).all()
    # 2D: ScanNet ids mapped through the tsv (checked against a column-wise parse of the tsv)
    tsv_path = out / "scannetv2-labels.combined.tsv"
    table = read_label_tsv(tsv_path)
    assert table == tsv_columns(tsv_path)
    zf = zipfile.ZipFile(d / f"{SCENE}_2d-label-filt.zip")
    raw = cv2.imdecode(np.frombuffer(zf.read("label-filt/3.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    got = read_2d_labels(d / f"{SCENE}_2d-label-filt.zip", 3, table)
    assert got.dtype == np.uint16 and got.shape == raw.shape == (240, 320)  # colour resolution
    expect = np.vectorize(lambda s: table.get(int(s), 0))(raw)
    np.testing.assert_array_equal(got, expect)
    assert (got != raw).any()  # the ids really are remapped (ScanNet ids are not NYU40)


def test_reader_counts(out):
    items = list(reader(out).frames(SCENE, 2))
    assert [(i.source_index, isinstance(i, Frame)) for i in items] == [(0, True), (2, True), (4, True)]
    assert not any(isinstance(i, Skip) for i in items)


def test_backprojected_depth_lands_on_the_mesh_with_the_2d_label(out):
    d = out / "scans" / SCENE
    xyz, _, nyu = read_labelled_mesh(d)
    xyz = xyz.astype(np.float64)
    table = tsv_columns(out / "scannetv2-labels.combined.tsv")
    fxc, fyc, cxc, cyc = sens_colour_k(d / f"{SCENE}.sens")
    frames = [f for f in reader(out).frames(SCENE, 1) if isinstance(f, Frame)]
    assert len(frames) == 6
    zf = zipfile.ZipFile(d / f"{SCENE}_2d-label-filt.zip")
    rng = np.random.default_rng(0)
    checked = nearest_agrees = 0
    for f in frames:
        lab = cv2.imdecode(np.frombuffer(zf.read(f"label-filt/{f.source_index}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = f.depth.shape
        rr, cc = np.nonzero(f.depth)
        pick = rng.choice(len(rr), 40, replace=False)
        fx, fy, cx, cy = f.intrinsics.astype(np.float64)
        for r, c in zip(rr[pick], cc[pick]):
            z = f.depth[r, c] / 1000.0
            p_cam = np.array([(c - cx) / fx * z, (r - cy) / fy * z, z])
            p = f.pose[:3, :3].astype(np.float64) @ p_cam + f.pose[:3, 3]
            dist = np.linalg.norm(xyz - p, axis=1)
            assert dist.min() < 0.05, f"frame {f.source_index} pixel {(r, c)} is {dist.min():.3f} m from the mesh"
            # the same 3D point in the colour camera (same pose, its own intrinsics): its 2D label
            u, v = fxc * p_cam[0] / z + cxc, fyc * p_cam[1] / z + cyc
            iu, iv = int(round(u)), int(round(v))
            block = lab[max(iv - 1, 0) : iv + 2, max(iu - 1, 0) : iu + 2]
            if block.size < 9 or (block != block[0, 0]).any():
                continue  # an object edge in the colour image
            want = table[int(block[0, 0])]
            assert want in set(nyu[dist < 0.05].tolist()), (f.source_index, r, c, want)
            nearest_agrees += int(nyu[dist.argmin()] == want)
            checked += 1
    assert checked > 150
    # thin wall-mounted things (pictures 1 cm proud of the wall) may have a wall vertex nearest
    assert nearest_agrees >= 0.9 * checked


# ----------------------------------------------------------------------------- appearance and layout


def sens_frames(path):
    """(header, [(pose, jpeg bytes, zlib depth bytes)]) of a .sens file, walked from its bytes."""
    data = path.read_bytes()
    header, pos, frames = read_header(data), header_size(data), []
    for _ in range(header["frames"]):
        pose = np.frombuffer(data, "<f4", 16, pos).reshape(4, 4).astype(np.float64)
        _, _, n_colour, n_depth = struct.unpack_from(FRAME_TAIL, data, pos + 64)
        pos += 64 + struct.calcsize(FRAME_TAIL)
        frames.append((pose, data[pos : pos + n_colour], data[pos + n_colour : pos + n_colour + n_depth]))
        pos += n_colour + n_depth
    return header, frames


def test_mesh_vertex_colours_match_the_images(out):
    """A vertex on the visible surface (its depth agrees with the depth image around its pixel) has the
    colour the JPEG shows where it projects in the colour camera."""
    d = out / "scans" / SCENE
    header, frames = sens_frames(d / f"{SCENE}.sens")
    mesh = parse_ply(d / f"{SCENE}_vh_clean_2.ply")
    xyz = np.stack([mesh["x"], mesh["y"], mesh["z"]], 1).astype(np.float64)
    rgb = np.stack([mesh["red"], mesh["green"], mesh["blue"]], 1).astype(np.float64)
    kc, kd = header["colour_k"].astype(np.float64), header["depth_k"].astype(np.float64)
    dh, dw, ch, cw = header["depth_h"], header["depth_w"], header["colour_h"], header["colour_w"]
    rng = np.random.default_rng(0)
    err, shuffled = [], []
    for pose, jpg, dep in frames:
        if not np.isfinite(pose).all():
            continue
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        depth = np.frombuffer(zlib.decompress(dep), "<u2").reshape(dh, dw) / 1000.0
        pc = (xyz - pose[:3, 3]) @ pose[:3, :3]
        z = np.maximum(pc[:, 2], 1e-6)
        iu, iv = (
            np.rint(kd[0, 0] * pc[:, 0] / z + kd[0, 2]).astype(int),
            np.rint(kd[1, 1] * pc[:, 1] / z + kd[1, 2]).astype(int),
        )
        ju, jv = (
            np.rint(kc[0, 0] * pc[:, 0] / z + kc[0, 2]).astype(int),
            np.rint(kc[1, 1] * pc[:, 1] / z + kc[1, 2]).astype(int),
        )
        ok = (pc[:, 2] > 0.3) & (iu >= 1) & (iu < dw - 1) & (iv >= 1) & (iv < dh - 1)
        ok &= (ju >= 0) & (ju < cw) & (jv >= 0) & (jv < ch)
        idx = np.flatnonzero(ok)
        block = np.stack([depth[iv[idx] + a, iu[idx] + b] for a in (-1, 0, 1) for b in (-1, 0, 1)], 1)
        idx = idx[(np.abs(block - z[idx, None]) < 0.02).all(1)]  # visible, away from depth edges
        pix = img[jv[idx], ju[idx]].astype(np.float64)
        err.append(np.abs(pix - rgb[idx]).max(1))
        shuffled.append(np.abs(pix - rgb[rng.permutation(idx)]).max(1))
    err, shuffled = np.concatenate(err), np.concatenate(shuffled)
    assert len(err) > 2000
    # JPEG noise and patterns finer than a pixel leave a tail; the bulk agrees to a few levels
    assert np.median(err) <= 6 and (err <= 20).mean() >= 0.8, (np.median(err), (err <= 20).mean())
    assert np.median(shuffled) >= 30  # the check can fail: other vertices' colours do not match


def rooms_with_paths(seed: int, n: int):
    """(room, tries) of the rooms ``generate`` would build for ``n`` scenes (make_room + trajectory)."""
    out = []
    for i in range(n):
        s = room_seed(seed, i)
        rng = np.random.default_rng(s)
        for tries in range(1, 51):
            room = make_room(rng, s)
            if trajectory(room, 60, rng) is not None:
                break
        out.append((room, tries))
    return out


@pytest.fixture(scope="module")
def many_rooms():
    return rooms_with_paths(5, 40)


def test_materials_are_one_pool_shared_by_the_classes(many_rooms):
    """Every instance (objects, walls, floor, ceiling) draws from the same pool: over 40 rooms every
    material shows on several NYU40 classes, and every common class shows many materials."""
    nyu = {k: v[2] for k, v in CLASSES.items()}
    classes_of, materials_of, instances = defaultdict(set), defaultdict(set), Counter()
    for room, _ in many_rooms:
        looks = {(id(p.look), nyu[p.key]): p.look for p in room.prims}  # one entry per look and class
        looks.update({(id(lk), 1 if f < 4 else 2 if f == 4 else 22): lk for f, lk in enumerate(room.looks)})
        for (_, cls), lk in looks.items():
            assert lk.material in MATERIALS and lk.colours.shape == (3, 3)
            assert ((lk.colours >= 0) & (lk.colours <= 1)).all()
            classes_of[lk.material].add(cls)
            materials_of[cls].add(lk.material)
            instances[cls] += 1
    assert set(classes_of) == set(MATERIALS)  # the whole pool is used
    assert min(len(c) for c in classes_of.values()) >= 3, {m: sorted(c) for m, c in classes_of.items()}
    common = [c for c, n in instances.items() if n >= 15]
    assert len(common) >= 12
    assert all(len(materials_of[c]) >= 5 for c in common), {c: sorted(materials_of[c]) for c in common}


def test_vertex_colour_does_not_single_out_a_class(tmp_path):
    """Written meshes of 20 rooms, parsed back: for no ScanNet-20 class does an interval on one colour
    feature (R, G, B, brightness, chroma) hold 90 % of its vertices and leave out most of the others'.
    A texture per class fails this (most classes reach a balanced accuracy of 0.7-0.93); a shared pool
    stays near chance (0.5)."""
    n = 20
    root = generate(tmp_path / "pool", scenes=n, seed=3, frames_per_scene=1, depth_size=[8, 8], mesh_spacing=0.2)
    rgb, nyu, room = [], [], []
    for i in range(n):
        d = root / "scans" / f"scene{i:04d}_00"
        mesh = parse_ply(d / f"scene{i:04d}_00_vh_clean_2.ply")
        rgb.append(np.stack([mesh["red"], mesh["green"], mesh["blue"]], 1).astype(np.float64))
        nyu.append(parse_ply(d / f"scene{i:04d}_00_vh_clean_2.labels.ply")["label"].astype(np.int64))
        room.append(np.full(len(mesh), i))
    rgb, room = np.concatenate(rgb), np.concatenate(room)
    bench = nyu40_to_scannet20(np.concatenate(nyu))
    feats = np.stack([rgb[:, 0], rgb[:, 1], rgb[:, 2], rgb.mean(1), rgb.max(1) - rgb.min(1)], 1)
    labelled = bench != 255
    checked = {}
    for c in np.unique(bench[labelled]):
        mine = bench == c
        if len(np.unique(room[mine])) < 5:
            continue
        rest = labelled & ~mine
        best = 0.0
        for f in feats.T:
            lo, hi = np.quantile(f[mine], [0.05, 0.95])
            outside = 1 - ((f[rest] >= lo) & (f[rest] <= hi)).mean()
            best = max(best, (0.9 + outside) / 2)  # balanced accuracy of "class c iff lo <= f <= hi"
        checked[int(c)] = round(best, 3)
    assert len(checked) >= 12, checked
    assert max(checked.values()) < 0.7, checked


def test_rooms_are_deterministic_and_differ_by_seed():
    a, b, c = (make_room(np.random.default_rng(s), s) for s in (11, 11, 12))
    assert len(a.prims) == len(b.prims)
    for p, q in zip(a.prims, b.prims):
        assert (p.key, p.yaw, p.radius, p.obj, p.material) == (q.key, q.yaw, q.radius, q.obj, q.material)
        np.testing.assert_array_equal(
            np.concatenate([p.center, p.half, p.colours.ravel(), p.look.params]),
            np.concatenate([q.center, q.half, q.colours.ravel(), q.look.params]),
        )
    assert [lk.material for lk in a.looks] == [lk.material for lk in b.looks]
    np.testing.assert_array_equal(np.stack([lk.colours for lk in a.looks]), np.stack([lk.colours for lk in b.looks]))
    assert not np.array_equal(a.size, c.size)


def _points_inside(prim, pts, shrink):
    """Points strictly inside ``prim`` shrunk by ``shrink`` metres (computed here, not by the generator)."""
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    d = pts - prim.center
    lx, ly, lz = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]
    inside = np.abs(lz) < prim.half[2] - shrink
    if prim.radius > 0:
        return inside & (np.hypot(lx, ly) < prim.radius - shrink)
    return inside & (np.abs(lx) < prim.half[0] - shrink) & (np.abs(ly) < prim.half[1] - shrink)


def _volume_samples(prim, n=7):
    g = np.linspace(-0.999, 0.999, n)
    a, b, z = (x.ravel() for x in np.meshgrid(g, g, g, indexing="ij"))
    if prim.radius > 0:
        keep = a * a + b * b <= 1
        a, b, z = a[keep] * prim.radius, b[keep] * prim.radius, z[keep] * prim.half[2]
    else:
        a, b, z = a * prim.half[0], b * prim.half[1], z * prim.half[2]
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    return prim.center + np.stack([c * a - s * b, s * a + c * b, z], 1)


def test_layouts_vary_and_stay_collision_free(many_rooms):
    """Over 40 rooms: 0, 1 and 2 tables all occur; beds, couches and desks are sometimes absent;
    some furniture stands free of the walls at an arbitrary yaw; sizes vary widely; objects do not
    interpenetrate; everything is inside the room; a camera path is found within a few tries."""
    tables, present, free_yawed, heights = Counter(), Counter(), Counter(), defaultdict(list)
    for room, tries in many_rooms:
        assert tries <= 3
        objs = defaultdict(list)
        for p in room.prims:
            objs[p.obj].append(p)
            c = p.corners()
            assert (c[:, :2] > -0.011).all() and (c[:, :2] < room.size[:2] + 0.011).all()  # flats: 1 cm behind
            assert (c[:, 2] > -1e-9).all() and (c[:, 2] < room.size[2]).all()
        keys = [ps[0].key for ps in objs.values()]
        tables[sum(k in ("table", "coffee table") for k in keys)] += 1
        for k in ("bed", "couch", "desk"):
            present[k] += k in keys
        for ps in objs.values():
            k = ps[0].key
            corners = np.concatenate([p.corners() for p in ps])
            heights[k].append(corners[:, 2].max())
            off_axis = abs(np.sin(2 * ps[0].yaw)) > 0.1
            away = (corners[:, :2].min(0) > 0.25).all() and (corners[:, :2].max(0) < room.size[:2] - 0.25).all()
            free_yawed[k] += off_axis and away
        pts = [_volume_samples(p) for p in room.prims]
        for i, a in enumerate(room.prims):
            for j, b in enumerate(room.prims):
                if a.obj != b.obj:
                    assert not _points_inside(b, pts[i], 0.005).any(), (a.key, b.key, a.obj, b.obj)
    n = len(many_rooms)
    assert {0, 1, 2} <= set(tables), tables
    assert all(0 < present[k] < n for k in ("bed", "couch", "desk")), present
    assert free_yawed["couch"] + free_yawed["desk"] >= 3 and free_yawed["table"] + free_yawed["coffee table"] >= 10
    assert np.ptp(heights["cabinet"]) > 1.0 and np.ptp(heights["bookshelf"]) > 0.8, heights
    # the overlap check itself sees an overlap
    box = make_room(np.random.default_rng(0), 0).prims[0]
    assert _points_inside(box, _volume_samples(box), 0.005).any()
