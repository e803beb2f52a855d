"""The synthetic generator: deterministic, in ScanNet's formats, geometrically consistent.

The checks parse the files independently of the generator's writers (PLY header and .sens header
with tests/fixtures' own parsers, the tsv by columns) and compare with
lift3d.pipeline.readers.scannet_labels.
"""

import zipfile

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
from tests.fixtures.ply import parse_ply as parse_ply_file
from tests.fixtures.scannet_bytes import read_header

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
