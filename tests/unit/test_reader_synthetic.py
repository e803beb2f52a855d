"""kind: synthetic: generation once into <workdir>/raw/<name> (marker + options hash, atomic
rename), then the ScanNet reader path; the generator's skip frames, splits and camera models;
the PLY reader on ASCII and big-endian files written here."""

import json
import struct

import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.ply import read_ply
from lift3d.pipeline.readers.synthetic import Reader
from tests.fixtures.scannet_bytes import read_header

ENTRY = {
    "name": "syn",
    "kind": "synthetic",
    "root": None,
    "frame_skip": 5,
    "split": "all",
    "scenes": 2,
    "seed": 1,
    "frames_per_scene": 40,
    "depth_size": [24, 32],
}


def test_prepare_once_then_read_as_scannet(tmp_path):
    r = Reader(dict(ENTRY), tmp_path)
    with pytest.raises(ReaderError, match="not generated"):
        next(iter(r.frames("scene0000_00", 5)))
    r.prepare()
    root = tmp_path / "raw" / "syn"
    marker = json.loads((root / "COMPLETE.json").read_text())
    assert marker["options"]["scenes"] == 2 and len(marker["options_sha256"]) == 64
    assert not list(tmp_path.glob("raw/syn.tmp-*")) and not list(tmp_path.glob("raw/syn.old-*"))
    stamp = (root / "scans" / "scene0000_00" / "scene0000_00.sens").stat().st_mtime_ns
    Reader(dict(ENTRY), tmp_path).prepare()  # same options: nothing is rewritten
    assert (root / "scans" / "scene0000_00" / "scene0000_00.sens").stat().st_mtime_ns == stamp
    assert r.scenes() == ["scene0000_00", "scene0001_00"] and r.stored_size() == (24, 32)
    assert (root / "scannetv2_train.txt").read_text().split() == ["scene0000_00"]
    assert (root / "scannetv2_val.txt").read_text().split() == ["scene0001_00"]
    assert Reader({**ENTRY, "split": "val"}, tmp_path).scenes() == ["scene0001_00"]
    # the generator's deliberate faults: frame 20 lost tracking (-inf); odd scenes: frame 35 empty depth
    got = {s: [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in r.frames(s, 5)] for s in r.scenes()}
    assert got["scene0000_00"] == [(i, "nonfinite_pose" if i == 20 else "ok") for i in range(0, 40, 5)]
    assert got["scene0001_00"] == [(i, {20: "nonfinite_pose", 35: "empty_depth"}.get(i, "ok")) for i in range(0, 40, 5)]
    f = next(iter(r.frames("scene0000_00", 5)))
    assert isinstance(f, Frame) and f.rgb.shape == (24, 32, 3) and f.depth.dtype == np.uint16
    assert (f.depth > 0).mean() > 0.9 and 300 < np.median(f.depth) < 9000  # a room, in millimetres
    # world z up: the camera is above the floor, looking slightly down
    assert 1.0 < f.pose[2, 3] < 2.0 and f.pose[2, 2] < 0


def test_changed_options_or_a_broken_copy_regenerate(tmp_path):
    Reader(dict(ENTRY), tmp_path).prepare()
    root = tmp_path / "raw" / "syn"
    old = (root / "scans" / "scene0000_00" / "scene0000_00.sens").read_bytes()
    r2 = Reader({**ENTRY, "seed": 2}, tmp_path)
    assert not r2.is_prepared()
    r2.prepare()
    assert (root / "scans" / "scene0000_00" / "scene0000_00.sens").read_bytes() != old
    # a half-written copy (no marker, as a killed run would leave) is never used
    (root / "COMPLETE.json").unlink()
    (root / "scans" / "scene0001_00" / "scene0001_00.sens").write_bytes(b"half")
    r3 = Reader({**ENTRY, "seed": 2}, tmp_path)
    assert r3.scenes() == ["scene0000_00", "scene0001_00"]  # scenes() prepares when needed
    assert (root / "scans" / "scene0001_00" / "scene0001_00.sens").stat().st_size > 1000


def test_sens_header_colour_camera_differs_from_depth(tmp_path):
    r = Reader(dict(ENTRY, scenes=1), tmp_path)
    r.prepare()
    header = read_header((tmp_path / "raw" / "syn" / "scans" / "scene0000_00" / "scene0000_00.sens").read_bytes())
    cc, dc, cw, ch, dw, dh, shift, frames = header["tail"]
    assert (cc, dc, cw, ch, dw, dh, shift, frames) == (2, 1, 64, 48, 32, 24, 1000.0, 40)
    kc, kd = header["colour_k"], header["depth_k"]
    scaled = [2 * kd[0, 0], 2 * kd[1, 1], (kd[0, 2] + 0.5) * 2 - 0.5, (kd[1, 2] + 0.5) * 2 - 0.5]
    assert not np.allclose([kc[0, 0], kc[1, 1], kc[0, 2], kc[1, 2]], scaled, atol=0.05)  # own colour K


def test_ply_reader_ascii_and_big_endian(tmp_path):
    head = (
        "ply\nformat {}\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty ushort label\nelement face 1\nproperty list uchar int vertex_indices\n"
        "end_header\n"
    )
    (tmp_path / "a.ply").write_text(head.format("ascii 1.0") + "0 0 0 10 1\n1 0 0 20 2\n0 1.5 0 30 40\n3 0 1 2\n")
    be = bytearray(head.format("binary_big_endian 1.0").encode())
    for xyz, red, lab in (((0, 0, 0), 10, 1), ((1, 0, 0), 20, 2), ((0, 1.5, 0), 30, 40)):
        be += struct.pack(">fffBH", *xyz, red, lab)
    be += struct.pack(">Biii", 3, 0, 1, 2)
    (tmp_path / "b.ply").write_bytes(bytes(be))
    for name in ("a.ply", "b.ply"):
        v, f = read_ply(tmp_path / name)
        np.testing.assert_allclose(v["y"], [0, 0, 1.5])
        np.testing.assert_array_equal(v["label"], [1, 2, 40])
        np.testing.assert_array_equal(v["red"], [10, 20, 30])
        np.testing.assert_array_equal(f, [[0, 1, 2]])
    (tmp_path / "c.ply").write_bytes(bytes(be[:-6]))
    with pytest.raises(ReaderError, match=r"c\.ply: PLY faces are not all triangles \(or the file is truncated\)"):
        read_ply(tmp_path / "c.ply")
