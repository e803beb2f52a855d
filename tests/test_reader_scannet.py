"""ScanNet .sens reader: colour alignment, seeking past unkept frames, more fault paths.

(tests/test_scannet_reader.py covers the basic decode, truncation and splits.) The files are
written here byte by byte with struct, in ScanNet's SensorData version-4 layout.
"""

import struct
import zlib

import cv2
import numpy as np
import pytest

from lift3d.pipeline.readers.base import Frame, ReaderError, Skip
from lift3d.pipeline.readers.scannet import Reader

DH, DW = 24, 32
DEPTH_K = (30.0, 30.0, 15.5, 11.5)
SCENE = "scene0007_00"


def m44(fx=0.0, fy=0.0, cx=0.0, cy=0.0, eye=False):
    m = np.eye(4, dtype="<f4") if eye or fx else np.zeros((4, 4), "<f4")
    if fx:
        m[0, 0], m[1, 1], m[0, 2], m[1, 2] = fx, fy, cx, cy
    return m


def ramp(ch, cw):
    """Red rises linearly along colour columns, green along rows: position readable from colour."""
    x, y = np.meshgrid(np.arange(cw), np.arange(ch))
    img = np.zeros((ch, cw, 3), np.uint8)
    img[..., 0] = np.rint(20 + 190 * x / (cw - 1))
    img[..., 1] = np.rint(40 + 150 * y / (ch - 1))
    img[..., 2] = 128
    return img


def depth_of(i):
    return (500 + 7 * i + 3 * np.arange(DH * DW).reshape(DH, DW)).astype("<u2")


def sens_bytes(n, colour_hw, colour_k, bad=None, version=4, compression=(2, 1)):
    """A whole .sens file. ``bad``: {frame: 'inf'|'nan'|'jpeg'|'zlib'}."""
    bad = bad or {}
    ch, cw = colour_hw
    b = bytearray(struct.pack("<I", version) + struct.pack("<Q", 4) + b"test")
    b += m44(*colour_k).tobytes() + m44(eye=True).tobytes() + m44(*DEPTH_K).tobytes() + m44(eye=True).tobytes()
    b += struct.pack("<iiIIIIfQ", compression[0], compression[1], cw, ch, DW, DH, 1000.0, n)
    for i in range(n):
        pose = np.eye(4, dtype="<f4")
        pose[:3, 3] = [0.5 * i, -1.0, 2.0]
        if bad.get(i) == "inf":
            pose[:] = -np.inf
        if bad.get(i) == "nan":
            pose[1, 3] = np.nan
        img = ramp(ch, cw)
        if compression[0] == 2:
            cb = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
        else:
            cb = img.tobytes()
        if bad.get(i) == "jpeg":
            cb = b"\xff\xd8\xff\xe0 garbage"
        raw = depth_of(i).tobytes()
        db = zlib.compress(raw) if compression[1] == 1 else raw
        if bad.get(i) == "zlib":
            db = b"\x78\x9c not zlib at all"
        b += pose.tobytes() + struct.pack("<QQQQ", 10 * i, 10 * i, len(cb), len(db)) + cb + db
    return bytes(b)


def put(root, data, scene=SCENE):
    p = root / "scans" / scene / f"{scene}.sens"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def reader(root, **entry):
    return Reader({"name": "s", "kind": "scannet", "root": str(root), "split": "all", **entry}, root)


@pytest.mark.parametrize("scale", [2, 4])
def test_colour_is_aligned_through_the_colour_intrinsics(tmp_path, scale):
    # colour camera: its own focal length and centre (not the depth K scaled)
    ch, cw = DH * scale, DW * scale
    ck = (33.0 * scale, 31.0 * scale, 15.0 * scale, 12.5 * scale)
    put(tmp_path, sens_bytes(1, (ch, cw), ck))
    f = next(iter(reader(tmp_path).frames(SCENE, 1)))
    assert f.rgb.shape == (DH, DW, 3)
    r, c = np.mgrid[0:DH, 0:DW]
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
    put(tmp_path, sens_bytes(10, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5), bad))
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
    np.testing.assert_array_equal(f8.depth, depth_of(8))
    np.testing.assert_allclose(f8.pose[:3, 3], [4.0, -1.0, 2.0])
    assert f8.pose.dtype == np.float32 and f8.intrinsics.dtype == np.float32


def test_uncompressed_colour_and_depth(tmp_path):
    put(tmp_path, sens_bytes(2, (DH, DW), DEPTH_K, compression=(0, 0)))
    f = list(reader(tmp_path).frames(SCENE, 1))[1]
    np.testing.assert_array_equal(f.depth, depth_of(1))
    np.testing.assert_array_equal(f.rgb, ramp(DH, DW))  # raw RGB, same grid and K: exact


def test_non_integer_resize_of_depth_and_intrinsics(tmp_path):
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5)))
    f = next(iter(reader(tmp_path, image_size=[18, 24]).frames(SCENE, 1)))
    # s = 0.75 on both axes: fx = 30 * 0.75; cx = (15.5 + 0.5) * 0.75 - 0.5; cy = (11.5 + 0.5) * 0.75 - 0.5
    np.testing.assert_allclose(f.intrinsics, [22.5, 22.5, 11.5, 8.5])
    # nearest about pixel centres: stored pixel j takes source floor(x), x = (j + 0.5) / 0.75; where x is
    # an integer the centre lies exactly between source pixels x - 1 and x, and either is nearest
    src = depth_of(0)

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
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5), version=5))
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: \.sens version 5"):
        list(reader(tmp_path).frames(SCENE, 1))
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5), compression=(3, 1)))
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: colour compression 3"):
        list(reader(tmp_path).frames(SCENE, 1))
    # zero colour intrinsics: an error when aligning through them, fine with a plain resize
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (0, 0, 0, 0)))
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: missing or invalid colour intrinsics"):
        list(reader(tmp_path).frames(SCENE, 1))
    assert isinstance(next(iter(reader(tmp_path, color_align="resize").frames(SCENE, 1))), Frame)
    # a truncated header (cut inside the matrices)
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5))[:150])
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: truncated \.sens header"):
        list(reader(tmp_path).frames(SCENE, 1))


def test_truncated_inside_the_last_kept_frame(tmp_path):
    data = sens_bytes(3, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5))
    put(tmp_path, data[:-5])
    it = reader(tmp_path).frames(SCENE, 1)
    assert next(it).source_index == 0 and next(it).source_index == 1
    with pytest.raises(ReaderError, match=rf"{SCENE}\.sens: truncated at frame 2 of 3"):
        next(it)


def test_missing_scene_file_and_split_naming_an_absent_scene(tmp_path):
    put(tmp_path, sens_bytes(1, (2 * DH, 2 * DW), (60, 60, 31.5, 23.5)))
    with pytest.raises(ReaderError, match=r"scene0001_00\.sens: cannot read"):
        list(reader(tmp_path).frames("scene0001_00", 1))
    (tmp_path / "scannetv2_val.txt").write_text(f"{SCENE}\nscene0999_00\n")
    with pytest.raises(ReaderError, match=r"scannetv2_val\.txt: 1 of the 2 scenes.*scene0999_00"):
        reader(tmp_path, split="val").scenes()
    (tmp_path / "scannetv2_val.txt").write_text(f"# val\n{SCENE}\n\n")
    assert reader(tmp_path, split="val").scenes() == [SCENE]
