"""The ScanNet .sens reader on files written here, byte by byte, in the version-4 layout."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.scannet import Reader

CH, CW, DH, DW = 32, 48, 16, 24  # colour is twice the depth grid, as in ScanNet (1296x968 vs 640x480)


def k44(fx, fy, cx, cy):
    m = np.eye(4, dtype="<f4")
    m[0, 0], m[1, 1], m[0, 2], m[1, 2] = fx, fy, cx, cy
    return m


def colour(i):
    """A smooth colour image (JPEG keeps it close): red ramps over columns, green is the frame index."""
    img = np.zeros((CH, CW, 3), np.uint8)
    img[..., 0] = np.linspace(0, 240, CW)[None, :]
    img[..., 1] = 20 * i
    img[..., 2] = 100
    return img


def depth(i):
    return (1000 + 10 * i + np.arange(DH * DW).reshape(DH, DW)).astype("<u2")


def write_sens(
    path, n=7, bad=None, depth_shift=1000.0, truncate_at=None, depth_hw=(DH, DW), k_depth=(20, 20, 11.5, 7.5)
):
    """Header then frames, in ScanNet's SensorData layout. ``bad``: {frame: 'pose'|'empty'|'jpeg'}."""
    bad = bad or {}
    out = bytearray()
    out += struct.pack("<I", 4) + struct.pack("<Q", 6) + b"tester"
    for m in (k44(40, 40, 23.5, 15.5), np.eye(4, dtype="<f4"), k44(*k_depth), np.eye(4, dtype="<f4")):
        out += m.astype("<f4").tobytes()
    out += struct.pack("<ii", 2, 1) + struct.pack("<IIII", CW, CH, depth_hw[1], depth_hw[0])
    out += struct.pack("<f", depth_shift) + struct.pack("<Q", n)
    for i in range(n):
        pose = np.eye(4, dtype="<f4")
        pose[:3, 3] = [i, 2 * i, 3 * i]
        if bad.get(i) == "pose":
            pose[0, 0] = -np.inf
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(colour(i), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
        cb = jpg.tobytes() if bad.get(i) != "jpeg" else b"\xff\xd8 not a jpeg"
        d = depth(i) if bad.get(i) != "empty" else np.zeros((DH, DW), "<u2")
        if depth_hw != (DH, DW):
            d = np.ones(depth_hw, "<u2")
        db = zlib.compress(d.tobytes())
        out += pose.tobytes() + struct.pack("<QQQQ", i, i, len(cb), len(db)) + cb + db
    if truncate_at is not None:
        out = out[:truncate_at]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return len(out)


def reader(root, **entry):
    return Reader({"name": "s", "kind": "scannet", "root": str(root), "split": "all", **entry}, root)


def sens(root, scene="scene0000_00"):
    return root / "scans" / scene / f"{scene}.sens"


def test_decodes_kept_frames_at_the_depth_grid(tmp_path):
    write_sens(sens(tmp_path), n=7)
    r = reader(tmp_path)
    assert r.scenes() == ["scene0000_00"] and r.stored_size() == (DH, DW)
    got = list(r.frames("scene0000_00", 3))
    assert [f.source_index for f in got] == [0, 3, 6]
    for f in got:
        assert isinstance(f, Frame)
        np.testing.assert_array_equal(f.depth, depth(f.source_index))  # millimetres, exact
        expect = cv2.resize(colour(f.source_index), (DW, DH), interpolation=cv2.INTER_AREA)
        assert f.rgb.shape == (DH, DW, 3)
        assert np.abs(f.rgb.astype(int) - expect.astype(int)).mean() < 4  # JPEG, RGB order
        np.testing.assert_allclose(f.intrinsics, [20, 20, 11.5, 7.5])  # the DEPTH intrinsics
        np.testing.assert_allclose(f.pose[:3, 3], [f.source_index, 2 * f.source_index, 3 * f.source_index])


def test_image_size_rescales_intrinsics_about_pixel_centres(tmp_path):
    write_sens(sens(tmp_path), n=1)
    f = next(iter(reader(tmp_path, image_size=[32, 48]).frames("scene0000_00", 1)))
    # doubling: f' = 2 f, c' = (c + 0.5) * 2 - 0.5
    np.testing.assert_allclose(f.intrinsics, [40, 40, 23.5, 15.5])
    assert f.depth.shape == (32, 48) and f.rgb.shape == (32, 48, 3)


def test_depth_shift_converts_to_millimetres(tmp_path):
    write_sens(sens(tmp_path), n=1, depth_shift=4000.0)  # quarter-millimetre units
    f = next(iter(reader(tmp_path).frames("scene0000_00", 1)))
    np.testing.assert_array_equal(f.depth, np.rint(depth(0) / 4.0).astype(np.uint16))


def test_frame_level_faults_are_skipped_with_reasons(tmp_path):
    write_sens(sens(tmp_path), n=6, bad={1: "pose", 2: "empty", 4: "jpeg"})
    got = list(reader(tmp_path).frames("scene0000_00", 1))
    kinds = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in got]
    assert kinds == [(0, "ok"), (1, "nonfinite_pose"), (2, "empty_depth"), (3, "ok"), (4, "corrupt_frame"), (5, "ok")]


def test_truncated_files_name_the_file(tmp_path):
    p = sens(tmp_path)
    write_sens(p, n=3, truncate_at=100)
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: truncated \.sens header"):
        list(reader(tmp_path).frames("scene0000_00", 1))
    size = write_sens(p, n=3)
    write_sens(p, n=3, truncate_at=size - 10)
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: truncated at frame 2"):
        list(reader(tmp_path).frames("scene0000_00", 1))


def test_wrong_size_depth_and_missing_intrinsics_are_errors(tmp_path):
    p = sens(tmp_path)
    write_sens(p, n=1, depth_hw=(DH, DW))
    raw = bytearray(p.read_bytes())
    # rewrite the header's depth width (not the frames): the frame's depth no longer fits
    off = 4 + 8 + 6 + 256 + 8 + 8
    struct.pack_into("<I", raw, off, DW + 1)
    p.write_bytes(bytes(raw))
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: frame 0 depth has"):
        list(reader(tmp_path).frames("scene0000_00", 1))
    write_sens(p, n=1, k_depth=(0, 0, 0, 0))
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: missing or invalid depth intrinsics"):
        list(reader(tmp_path).frames("scene0000_00", 1))


def test_splits_and_missing_split_file(tmp_path):
    for s in ("scene0000_00", "scene0001_00", "scene0002_00"):
        write_sens(sens(tmp_path, s), n=1)
    (tmp_path / "scannetv2_train.txt").write_text("scene0000_00\nscene0002_00\n")
    assert reader(tmp_path, split="train").scenes() == ["scene0000_00", "scene0002_00"]
    with pytest.raises(ReaderError, match="scannetv2_val.txt not found"):
        reader(tmp_path, split="val").scenes()
    with pytest.raises(ReaderError, match="not a folder"):
        reader(tmp_path / "nowhere").scenes()
