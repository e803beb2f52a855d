"""The ScanNet .sens reader on files written byte by byte with struct, in ScanNet's SensorData
version-4 layout (tests/fixtures/scannet_bytes.py): the basic decode, depth shift, splits and
truncation; colour alignment through the colour intrinsics, seeking past unkept frames, the
uncompressed codecs, resizing and the header's fault paths."""

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.scannet import Reader
from tests.fixtures.scannet_bytes import BasicScene, RampScene, put, sens_path, set_header_depth_width

SCENE = "scene0007_00"  # the ramp scenes' name (the basic ones are scene0000_00)


def reader(root, **entry):
    return Reader({"name": "s", "kind": "scannet", "root": str(root), "split": "all", **entry}, root)


# -- basic scenes: colour twice the depth grid ----------------------------------------------------
B = BasicScene
CH, CW, DH, DW = B.CH, B.CW, B.DH, B.DW


def test_decodes_kept_frames_at_the_depth_grid(tmp_path):
    B.write(sens_path(tmp_path, "scene0000_00"), n=7)
    r = reader(tmp_path)
    assert r.scenes() == ["scene0000_00"] and r.stored_size() == (DH, DW)
    got = list(r.frames("scene0000_00", 3))
    assert [f.source_index for f in got] == [0, 3, 6]
    for f in got:
        assert isinstance(f, Frame)
        np.testing.assert_array_equal(f.depth, B.depth(f.source_index))  # millimetres, exact
        expect = cv2.resize(B.colour(f.source_index), (DW, DH), interpolation=cv2.INTER_AREA)
        assert f.rgb.shape == (DH, DW, 3)
        assert np.abs(f.rgb.astype(int) - expect.astype(int)).mean() < 4  # JPEG, RGB order
        np.testing.assert_allclose(f.intrinsics, [20, 20, 11.5, 7.5])  # the DEPTH intrinsics
        np.testing.assert_allclose(f.pose[:3, 3], [f.source_index, 2 * f.source_index, 3 * f.source_index])


def test_image_size_rescales_intrinsics_about_pixel_centres(tmp_path):
    B.write(sens_path(tmp_path, "scene0000_00"), n=1)
    f = next(iter(reader(tmp_path, image_size=[32, 48]).frames("scene0000_00", 1)))
    # doubling: f' = 2 f, c' = (c + 0.5) * 2 - 0.5
    np.testing.assert_allclose(f.intrinsics, [40, 40, 23.5, 15.5])
    assert f.depth.shape == (32, 48) and f.rgb.shape == (32, 48, 3)


def test_depth_shift_converts_to_millimetres(tmp_path):
    B.write(sens_path(tmp_path, "scene0000_00"), n=1, depth_shift=4000.0)  # quarter-millimetre units
    f = next(iter(reader(tmp_path).frames("scene0000_00", 1)))
    np.testing.assert_array_equal(f.depth, np.rint(B.depth(0) / 4.0).astype(np.uint16))


def test_frame_level_faults_are_skipped_with_reasons(tmp_path):
    B.write(sens_path(tmp_path, "scene0000_00"), n=6, bad={1: "pose", 2: "empty", 4: "jpeg"})
    got = list(reader(tmp_path).frames("scene0000_00", 1))
    kinds = [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in got]
    assert kinds == [(0, "ok"), (1, "nonfinite_pose"), (2, "empty_depth"), (3, "ok"), (4, "corrupt_frame"), (5, "ok")]


def test_truncated_files_name_the_file(tmp_path):
    p = sens_path(tmp_path, "scene0000_00")
    B.write(p, n=3, truncate_at=100)
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: truncated \.sens header"):
        list(reader(tmp_path).frames("scene0000_00", 1))
    size = B.write(p, n=3)
    B.write(p, n=3, truncate_at=size - 10)
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: truncated at frame 2"):
        list(reader(tmp_path).frames("scene0000_00", 1))


def test_wrong_size_depth_and_missing_intrinsics_are_errors(tmp_path):
    p = sens_path(tmp_path, "scene0000_00")
    B.write(p, n=1, depth_hw=(DH, DW))
    # rewrite the header's depth width (not the frames): the frame's depth no longer fits
    set_header_depth_width(p, DW + 1)
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: frame 0 depth has"):
        list(reader(tmp_path).frames("scene0000_00", 1))
    B.write(p, n=1, k_depth=(0, 0, 0, 0))
    with pytest.raises(ReaderError, match=r"scene0000_00\.sens: missing or invalid depth intrinsics"):
        list(reader(tmp_path).frames("scene0000_00", 1))


def test_splits_and_missing_split_file(tmp_path):
    for s in ("scene0000_00", "scene0001_00", "scene0002_00"):
        B.write(sens_path(tmp_path, s), n=1)
    (tmp_path / "scannetv2_train.txt").write_text("scene0000_00\nscene0002_00\n")
    assert reader(tmp_path, split="train").scenes() == ["scene0000_00", "scene0002_00"]
    with pytest.raises(ReaderError, match="scannetv2_val.txt not found"):
        reader(tmp_path, split="val").scenes()
    with pytest.raises(ReaderError, match="not a folder"):
        reader(tmp_path / "nowhere").scenes()


# -- ramp scenes: a colour camera of its own -------------------------------------------------------
R = RampScene
RDH, RDW, DEPTH_K = R.DH, R.DW, R.DEPTH_K


@pytest.mark.parametrize("scale", [2, 4])
def test_colour_is_aligned_through_the_colour_intrinsics(tmp_path, scale):
    # colour camera: its own focal length and centre (not the depth K scaled)
    ch, cw = RDH * scale, RDW * scale
    ck = (33.0 * scale, 31.0 * scale, 15.0 * scale, 12.5 * scale)
    put(tmp_path, R.data(1, (ch, cw), ck), SCENE)
    f = next(iter(reader(tmp_path).frames(SCENE, 1)))
    assert f.rgb.shape == (RDH, RDW, 3)
    r, c = np.mgrid[0:RDH, 0:RDW]
    # stored pixel -> ray through the depth K -> colour pixel through the colour K
    xc = ck[0] * (c - DEPTH_K[2]) / DEPTH_K[0] + ck[2]
    yc = ck[1] * (r - DEPTH_K[3]) / DEPTH_K[1] + ck[3]
    inside = (xc > scale) & (xc < cw - 1 - scale) & (yc > scale) & (yc < ch - 1 - scale)
    exp_r, exp_g = 20 + 190 * xc / (cw - 1), 40 + 150 * yc / (ch - 1)
    assert inside.sum() > 300
    assert np.abs(f.rgb[..., 0][inside] - exp_r[inside]).max() < 4
    assert np.abs(f.rgb[..., 1][inside] - exp_g[inside]).max() < 4
    # a plain resize would put colour pixel (c + 0.5) * scale - 0.5 there instead: measurably off
    plain = next(iter(reader(tmp_path, color_align="resize").frames(SCENE, 1)))
    exp_plain = 20 + 190 * ((c + 0.5) * scale - 0.5) / (cw - 1)
    assert np.abs(plain.rgb[..., 0].astype(float) - exp_plain).max() < 4
    assert np.abs(plain.rgb[..., 0][inside] - exp_r[inside]).max() > 8


def test_unkept_frames_are_never_decoded_and_skips_only_for_kept_ones(tmp_path):
    bad = {1: "jpeg", 2: "inf", 3: "zlib", 4: "nan", 5: "inf", 6: "zlib", 9: "jpeg"}
    put(tmp_path, R.data(10, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5), bad), SCENE)
    got = list(reader(tmp_path).frames(SCENE, 3))
    assert [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in got] == [
        (0, "ok"),
        (3, "corrupt_frame"),
        (6, "corrupt_frame"),
        (9, "corrupt_frame"),
    ]
    got = list(reader(tmp_path).frames(SCENE, 2))
    assert [(g.source_index, g.reason if isinstance(g, Skip) else "ok") for g in got] == [
        (0, "ok"),
        (2, "nonfinite_pose"),
        (4, "nonfinite_pose"),
        (6, "corrupt_frame"),
        (8, "ok"),
    ]
    f8 = got[-1]
    np.testing.assert_array_equal(f8.depth, R.depth(8))
    np.testing.assert_allclose(f8.pose[:3, 3], [4.0, -1.0, 2.0])
    assert f8.pose.dtype == np.float32 and f8.intrinsics.dtype == np.float32


def test_uncompressed_colour_and_depth(tmp_path):
    put(tmp_path, R.data(2, (RDH, RDW), DEPTH_K, compression=(0, 0)), SCENE)
    f = list(reader(tmp_path).frames(SCENE, 1))[1]
    np.testing.assert_array_equal(f.depth, R.depth(1))
    np.testing.assert_array_equal(f.rgb, R.ramp(RDH, RDW))  # raw RGB, same grid and K: exact


def test_non_integer_resize_of_depth_and_intrinsics(tmp_path):
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5)), SCENE)
    f = next(iter(reader(tmp_path, image_size=[18, 24]).frames(SCENE, 1)))
    # s = 0.75 on both axes: fx = 30 * 0.75; cx = (15.5 + 0.5) * 0.75 - 0.5; cy = (11.5 + 0.5) * 0.75 - 0.5
    np.testing.assert_allclose(f.intrinsics, [22.5, 22.5, 11.5, 8.5])
    # nearest about pixel centres: stored pixel j takes source floor(x), x = (j + 0.5) / 0.75; where x is
    # an integer the centre lies exactly between source pixels x - 1 and x, and either is nearest
    src = R.depth(0)

    def choices(n):
        x = (np.arange(n) + 0.5) / 0.75
        lo = np.floor(x).astype(int)
        return lo, np.where(x == lo, lo - 1, lo)

    (r0, r1), (c0, c1) = choices(18), choices(24)
    ok = np.zeros((18, 24), bool)
    for rr in (r0, r1):
        for cc in (c0, c1):
            ok |= f.depth == src[rr][:, cc]
    assert ok.all()
    assert set(np.unique(f.depth)) <= set(np.unique(src))  # never interpolated


def test_header_problems_name_the_file(tmp_path):
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5), version=5), SCENE)
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: \.sens version 5"):
        list(reader(tmp_path).frames(SCENE, 1))
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5), compression=(3, 1)), SCENE)
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: colour compression 3"):
        list(reader(tmp_path).frames(SCENE, 1))
    # zero colour intrinsics: an error when aligning through them, fine with a plain resize
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), np.zeros((4, 4))), SCENE)
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: missing or invalid colour intrinsics"):
        list(reader(tmp_path).frames(SCENE, 1))
    assert isinstance(next(iter(reader(tmp_path, color_align="resize").frames(SCENE, 1))), Frame)
    # a truncated header (cut inside the matrices)
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5))[:150], SCENE)
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: truncated \.sens header"):
        list(reader(tmp_path).frames(SCENE, 1))


def test_truncated_inside_the_last_kept_frame(tmp_path):
    data = R.data(3, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5))
    put(tmp_path, data[:-5], SCENE)
    it = reader(tmp_path).frames(SCENE, 1)
    assert next(it).source_index == 0 and next(it).source_index == 1
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: truncated at frame 2 of 3"):
        next(it)


def test_missing_scene_file_and_split_naming_an_absent_scene(tmp_path):
    put(tmp_path, R.data(1, (2 * RDH, 2 * RDW), (60, 60, 31.5, 23.5)), SCENE)
    with pytest.raises(ReaderError, match=r"scene0001_00\.sens: cannot read"):
        list(reader(tmp_path).frames("scene0001_00", 1))
    (tmp_path / "scannetv2_val.txt").write_text(f"{SCENE}\nscene0999_00\n")
    with pytest.raises(ReaderError, match=r"scannetv2_val\.txt: 1 of the 2 scenes.*scene0999_00"):
        reader(tmp_path, split="val").scenes()
    (tmp_path / "scannetv2_val.txt").write_text(f"# val\n{SCENE}\n\n")
    assert reader(tmp_path, split="val").scenes() == [SCENE]
