"""The synthetic generator: deterministic, in ScanNet's formats, geometrically consistent."""

import io
import zipfile

import cv2
import numpy as np
import pytest

from pipeline.readers import Frame
from pipeline.scannet import Reader
from pipeline.synthetic import generate

OPTS = dict(scenes=1, seed=3, depth_size=[30, 40], frames_per_scene=6)


def read_ply(path):
    """Binary little-endian PLY vertices, parsed from the header independently of the writer."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    assert header[1] == "format binary_little_endian 1.0"
    n = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    types = {"float": "<f4", "uchar": "u1", "ushort": "<u2", "int": "<i4"}
    props, in_vertex = [], False
    for line in header:
        if line.startswith("element"):
            in_vertex = line.startswith("element vertex")
        elif line.startswith("property") and in_vertex:
            _, t, name = line.split()
            props.append((name, types[t]))
    return np.frombuffer(data, dtype=props, count=n, offset=end)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "a", **OPTS)


def test_same_seed_same_bytes(out, tmp_path):
    again = generate(tmp_path / "b", **OPTS)
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        assert f.read_bytes() == (again / f.relative_to(out)).read_bytes(), f.name


def test_backprojected_depth_lands_on_the_mesh_with_the_2d_label(out):
    scene = "scene0000_00"
    d = out / "scans" / scene
    mesh = read_ply(d / f"{scene}_vh_clean_2.labels.ply")
    xyz = np.stack([mesh["x"], mesh["y"], mesh["z"]], 1).astype(np.float64)
    tsv = [line.split("\t") for line in (out / "scannetv2-labels.combined.tsv").read_text().splitlines()]
    col = {name: i for i, name in enumerate(tsv[0])}
    to_nyu = {int(r[col["id"]]): int(r[col["nyu40id"]]) for r in tsv[1:]}
    frames = [f for f in Reader({"name": "s", "kind": "scannet", "root": str(out), "split": "all"}, out)
              .frames(scene, 1) if isinstance(f, Frame)]
    assert len(frames) == 6
    zf = zipfile.ZipFile(d / f"{scene}_2d-label-filt.zip")
    rng = np.random.default_rng(0)
    checked = 0
    for f in frames:
        lab = cv2.imdecode(np.frombuffer(zf.read(f"label-filt/{f.source_index}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
        assert lab.dtype == np.uint16 and lab.shape == (60, 80)  # ScanNet ids at colour resolution
        fx, fy, cx, cy = f.intrinsics
        for r, c in zip(rng.integers(2, 28, 25), rng.integers(2, 38, 25)):
            z = f.depth[r, c] / 1000.0
            p_cam = np.array([(c - cx) / fx * z, (r - cy) / fy * z, z])
            p = f.pose[:3, :3].astype(np.float64) @ p_cam + f.pose[:3, 3]
            dist = np.linalg.norm(xyz - p, axis=1)
            near = dist < 0.1  # the mesh grid is 10 cm
            assert near.any(), f"frame {f.source_index} pixel {(r, c)} is {dist.min():.3f} m from the mesh"
            # depth pixel (r, c) covers colour pixels 2r..2r+1, 2c..2c+1; object edges are skipped
            block = lab[2 * r:2 * r + 2, 2 * c:2 * c + 2]
            if (block != block[0, 0]).any():
                continue
            nyu = to_nyu[int(block[0, 0])]
            assert nyu in set(mesh["label"][near].tolist())
            checked += 1
    assert checked > 120
