"""ScanNet exported frames (color/N.jpg, depth/N.png, pose/N.txt, intrinsic/*.txt), written with
cv2/numpy in the export's layout (tests/fixtures/scannet_export_files.py) and read back."""

import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.scannet_export import Reader
from tests.fixtures.scannet_export_files import DH, DW, KD, SCENE, depth_of, write_scene


def reader(root, **kw):
    return Reader({"name": "e", "kind": "scannet_export", "root": str(root), "split": "all", **kw}, root)


def test_values_frame_skip_and_colour_alignment(tmp_path):
    write_scene(tmp_path, n=7)
    r = reader(tmp_path)
    assert r.scenes() == [SCENE] and r.stored_size() == (DH, DW)
    got = list(r.frames(SCENE, 3))
    assert [g.source_index for g in got] == [0, 3, 6] and all(isinstance(g, Frame) for g in got)
    kc = (66.0, 62.0, 31.0, 24.5)
    rr, cc = np.mgrid[0:DH, 0:DW]
    xc, yc = kc[0] * (cc - KD[2]) / KD[0] + kc[2], kc[1] * (rr - KD[3]) / KD[1] + kc[3]
    inside = (xc > 2) & (xc < 2 * DW - 3) & (yc > 2) & (yc < 2 * DH - 3)
    for f in got:
        np.testing.assert_array_equal(f.depth, depth_of(f.source_index))
        np.testing.assert_allclose(f.pose[:3, 3], [f.source_index, -f.source_index, 0.25 * f.source_index])
        np.testing.assert_allclose(f.intrinsics, KD)
        assert np.abs(f.rgb[..., 0][inside] - (20 + 190 * xc / (2 * DW - 1))[inside]).max() < 4
        assert np.abs(f.rgb[..., 1][inside] - (40 + 150 * yc / (2 * DH - 1))[inside]).max() < 4


def test_without_colour_intrinsics_a_plain_resize(tmp_path):
    write_scene(tmp_path, n=1, colour_k=False)
    f = next(iter(reader(tmp_path).frames(SCENE, 1)))
    cc = np.arange(DW)
    expect = 20 + 190 * ((cc + 0.5) * 2 - 0.5) / (2 * DW - 1)
    assert np.abs(f.rgb[5, :, 0] - expect).max() < 4


def test_image_size_scales_intrinsics(tmp_path):
    write_scene(tmp_path, n=1)
    f = next(iter(reader(tmp_path, image_size=[12, 16]).frames(SCENE, 1)))
    # s = 1/2: fx = 15, cx = (15.5 + 0.5) / 2 - 0.5 = 7.5, cy = (11.5 + 0.5) / 2 - 0.5 = 5.5
    np.testing.assert_allclose(f.intrinsics, [15, 15, 7.5, 5.5])
    np.testing.assert_array_equal(f.depth, depth_of(0)[1::2, 1::2])  # nearest about pixel centres


def test_skips(tmp_path):
    write_scene(tmp_path, n=5, bad={1: "pose", 2: "empty", 3: "jpeg"})
    got = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in reader(tmp_path).frames(SCENE, 1)]
    assert got == [(0, "ok"), (1, "nonfinite_pose"), (2, "empty_depth"), (3, "corrupt_frame"), (4, "ok")]


def test_errors_name_the_file(tmp_path):
    d = write_scene(tmp_path, n=3, bad={2: "size"})
    with pytest.raises(ReaderError, match=r"depth[/\\]2\.png: depth is 32x26"):
        list(reader(tmp_path).frames(SCENE, 1))
    (d / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(ReaderError, match=r"intrinsic_depth\.txt: cannot read depth intrinsics"):
        list(reader(tmp_path).frames(SCENE, 1))
    write_scene(tmp_path, n=3)
    (d / "pose" / "1.txt").unlink()
    with pytest.raises(ReaderError, match=r"pose[/\\]1\.txt: cannot read pose"):
        list(reader(tmp_path).frames(SCENE, 1))


def test_splits(tmp_path):
    write_scene(tmp_path, n=1)
    write_scene(tmp_path, n=1, scene="scene0004_00")
    (tmp_path / "scannetv2_train.txt").write_text("scene0004_00\n")
    assert reader(tmp_path, split="train").scenes() == ["scene0004_00"]
    assert reader(tmp_path).scenes() == [SCENE, "scene0004_00"]
    with pytest.raises(ReaderError, match=r"scannetv2_val\.txt not found"):
        reader(tmp_path, split="val").scenes()
