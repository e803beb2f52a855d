"""Ground-truth 2D labels of every reader as ScanNet-20 (``reader.labels_2d()``), on files written in
each dataset's own format (tests/fixtures/labels2d.py): ScanNet's 16-bit label-filt PNGs (zipped or
unpacked) with the tsv, the exported frames' label-filt folders, the synthetic rooms, SUN RGB-D's
seg.mat. Expected values are written out by hand below; bad input must name its file."""

import zipfile

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from lift3d.pipeline.readers.base import LabelSource, ReaderError, make_reader
from lift3d.pipeline.readers.common import encoded_image_hw, image_hw
from lift3d.pipeline.readers.scannet_labels import default_labels
from tests.fixtures.labels2d import png16, write_label_folder, write_label_zip, write_seg_mat, write_tsv
from tests.fixtures.scannet_bytes import SensFrame, encode_colour, encode_depth, put, sens_bytes
from tests.fixtures.scannet_export_files import DH, DW, write_scene
from tests.fixtures.sunrgbd_files import write_folder

SCENE = "scene0007_00"
X = 255  # IGNORE_INDEX, written out

# ScanNet label id -> NYU40 id, as rows of scannetv2-labels.combined.tsv (203: a row without nyu40id)
TSV_ROWS = [
    (1, "wall", 1),
    (2, "chair", 5),
    (3, "floor", 2),
    (4, "table", 7),
    (8, "shelf", 15),
    (41, "ceiling", 22),
    (203, "object", ""),
    (1300, "stand", 39),
]
# the 3 x 4 label image of ScanNet ids (0 = unlabelled; 1300 needs the 16 bits) and, by hand,
# id -> NYU40 -> ScanNet-20: 1 -> 1 wall -> 0; 2 -> 5 chair -> 4; 3 -> 2 floor -> 1; 4 -> 7 table
# -> 6; 8 -> 15 shelves -> none; 41 -> 22 ceiling -> none; 203 -> (empty) 0 -> none; 1300 -> 39
# otherfurniture -> 19; 0 -> none
IDS = np.array([[0, 1, 1, 3], [2, 41, 3, 4], [1300, 8, 203, 0]], np.uint16)
EXPECT = np.array([[X, 0, 0, 1], [4, X, 1, 6], [19, X, X, X]], np.uint8)
COLOUR_HW, DEPTH_HW = (6, 8), (3, 4)  # colour twice the depth grid, as ScanNet's 1296x968 vs 640x480


def up(a, k=2):
    """Each pixel of ``a`` as a k x k block (label images at the colour resolution)."""
    return np.kron(a, np.ones((k, k), a.dtype))


# ----------------------------------------------------------------------------- ScanNet raw layout


def scannet_root(tmp_path, scene=SCENE, colour_hw=COLOUR_HW):
    """``<root>/scans/<scene>/<scene>.sens`` (one frame; colour 6 x 8, depth 3 x 4) and the tsv."""
    root = tmp_path / "scannet"
    rgb = np.full((*colour_hw, 3), 128, np.uint8)
    frame = SensFrame(np.eye(4, dtype="<f4"), encode_colour(rgb), encode_depth(np.full(DEPTH_HW, 1000, "<u2")))
    data = sens_bytes(
        [frame], colour_k=(8, 8, 3.5, 2.5), depth_k=(4, 4, 1.5, 1), colour_hw=colour_hw, depth_hw=DEPTH_HW
    )
    put(root, data, scene)
    write_tsv(root / "scannetv2-labels.combined.tsv", TSV_ROWS)
    return root


def scannet_entry(root, kind="scannet"):
    return {"name": "s", "kind": kind, "root": str(root), "split": "all"}


def test_scannet_zip_maps_ids_through_the_tsv_and_nyu40(tmp_path):
    root = scannet_root(tmp_path)
    write_label_zip(root / "scans" / SCENE / f"{SCENE}_2d-label-filt.zip", {0: up(IDS), 25: up(IDS[::-1])})
    src = make_reader(scannet_entry(root), tmp_path).labels_2d()
    assert isinstance(src, LabelSource)
    with src:
        got = src(SCENE, 0)
        assert got.dtype == np.uint8 and got.shape == COLOUR_HW  # the label image's own (colour) size
        np.testing.assert_array_equal(got, up(EXPECT))
        np.testing.assert_array_equal(src(SCENE, 25), up(EXPECT[::-1]))
        assert src(SCENE, 5) is None  # a frame without a label image
        assert src("scene0099_00", 0) is None  # a scene without labels
    np.testing.assert_array_equal(src(SCENE, 0), up(EXPECT))  # reopened after close()
    src.close()
    # the existing callers' entry point: a thin wrapper over make_reader(entry, wd).labels_2d()
    with default_labels(scannet_entry(root), tmp_path) as labels:
        np.testing.assert_array_equal(labels(SCENE, 0), up(EXPECT))


def test_scannet_unpacked_label_filt_folder(tmp_path):
    """``scans/<scene>/label-filt/<frame>.png`` (the unpacked zip) is read first; frames only in
    the zip still come from the zip."""
    root = scannet_root(tmp_path)
    write_label_folder(root / "scans" / SCENE / "label-filt", {3: up(IDS)})
    write_label_zip(root / "scans" / SCENE / f"{SCENE}_2d-label-filt.zip", {3: up(IDS[::-1]), 4: up(IDS[::-1])})
    src = make_reader(scannet_entry(root), tmp_path).labels_2d()
    np.testing.assert_array_equal(src(SCENE, 3), up(EXPECT))
    np.testing.assert_array_equal(src(SCENE, 4), up(EXPECT[::-1]))
    assert src(SCENE, 5) is None
    src.close()


def test_scannet_8bit_png_and_tsv_beside_root(tmp_path):
    """An 8-bit label PNG (ids < 256) reads like a 16-bit one; the tsv may sit in root's parent."""
    root = scannet_root(tmp_path)
    (root / "scannetv2-labels.combined.tsv").rename(tmp_path / "scannetv2-labels.combined.tsv")
    ok, png8 = cv2.imencode(".png", up(IDS[:2]).astype(np.uint8))
    write_label_folder(root / "scans" / SCENE / "label-filt", {0: png8.tobytes()})
    src = make_reader(scannet_entry(root), tmp_path).labels_2d()
    with pytest.raises(ReaderError, match=r"label image is 8x4 but the frame's colour image is 8x6"):
        src(SCENE, 0)  # two rows only: not the colour size
    ok, png8 = cv2.imencode(".png", up(np.vstack([IDS[:2], IDS[:1]])).astype(np.uint8))
    write_label_folder(root / "scans" / SCENE / "label-filt", {0: png8.tobytes()})
    np.testing.assert_array_equal(src(SCENE, 0), up(np.vstack([EXPECT[:2], EXPECT[:1]])))


def test_scannet_without_scans_or_root_has_no_labels(tmp_path):
    assert make_reader(scannet_entry(tmp_path / "absent"), tmp_path).labels_2d() is None
    assert default_labels({"name": "s", "kind": "scannet", "root": None}, tmp_path) is None


def test_scannet_bad_input_names_the_file(tmp_path):
    root = scannet_root(tmp_path)
    zpath = root / "scans" / SCENE / f"{SCENE}_2d-label-filt.zip"
    bad_id = up(IDS).copy()
    bad_id[0, 0] = bad_id[5, 7] = 77  # not in the tsv
    rgb_png = cv2.imencode(".png", np.zeros((*COLOUR_HW, 3), np.uint8))[1].tobytes()
    jpg = cv2.imencode(".jpg", np.zeros(COLOUR_HW, np.uint8))[1].tobytes()
    write_label_zip(
        zpath,
        {0: IDS, 1: bad_id, 2: png16(up(IDS))[:60], 3: rgb_png, 4: jpg},
    )
    src = make_reader(scannet_entry(root), tmp_path).labels_2d()
    zname = str(zpath)
    # (a) a label image at the depth size (4 x 3), not the .sens header's colour size (8 x 6)
    with pytest.raises(ReaderError, match=r"label-filt/0\.png: label image is 4x3 but the frame's colour image is 8x6"):
        src(SCENE, 0)
    with pytest.raises(ReaderError) as e:
        src(SCENE, 0)
    assert zname in str(e.value) and f"{SCENE}.sens" in str(e.value)
    # (b) an id the tsv does not list
    with pytest.raises(
        ReaderError, match=r"label-filt/1\.png: label ids 77 \(2 pixels\) are not in .*labels\.combined\.tsv"
    ):
        src(SCENE, 1)
    # (c) a truncated PNG, a 3-channel PNG, a JPEG
    with pytest.raises(ReaderError, match=r"label-filt/2\.png: unreadable PNG"):
        src(SCENE, 2)
    with pytest.raises(ReaderError, match=r"label-filt/3\.png: label image has 3 channels"):
        src(SCENE, 3)
    with pytest.raises(ReaderError, match=r"label-filt/4\.png: not a PNG file"):
        src(SCENE, 4)
    for frame in range(5):
        with pytest.raises(ReaderError) as e:
            src(SCENE, frame)
        assert zname in str(e.value)
    src.close()
    # a damaged archive, a missing tsv, a tsv row outside NYU40
    zpath.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ReaderError, match=r"2d-label-filt\.zip: not a readable zip archive"):
        make_reader(scannet_entry(root), tmp_path).labels_2d()(SCENE, 0)
    write_label_folder(root / "scans" / SCENE / "label-filt", {0: up(IDS)})
    (root / "scannetv2-labels.combined.tsv").unlink()
    with pytest.raises(ReaderError, match=r"scannetv2-labels\.combined\.tsv: not found"):
        make_reader(scannet_entry(root), tmp_path).labels_2d()(SCENE, 0)
    write_tsv(root / "scannetv2-labels.combined.tsv", TSV_ROWS + [(9, "odd", 55)])
    with pytest.raises(ReaderError, match=r"labels\.combined\.tsv: id 9 has nyu40id 55, outside 0\.\.40"):
        make_reader(scannet_entry(root), tmp_path).labels_2d()(SCENE, 0)


# ----------------------------------------------------------------------------- exported frames


def test_scannet_export_label_folder(tmp_path):
    """``<root>/<scene>/label-filt/<N>.png`` at color/<N>.jpg's size (48 x 64: 16 x 16 blocks of IDS)."""
    write_scene(tmp_path, n=3, scene=SCENE)
    write_tsv(tmp_path / "scannetv2-labels.combined.tsv", TSV_ROWS)
    write_label_folder(tmp_path / SCENE / "label-filt", {0: up(IDS, 16), 2: up(IDS[::-1], 16)})
    entry = {"name": "e", "kind": "scannet_export", "root": str(tmp_path), "split": "all"}
    with make_reader(entry, tmp_path).labels_2d() as src:
        got = src(SCENE, 0)
        assert got.shape == (2 * DH, 2 * DW) == (48, 64) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, up(EXPECT, 16))
        np.testing.assert_array_equal(src(SCENE, 2), up(EXPECT[::-1], 16))
        assert src(SCENE, 1) is None
    assert default_labels(entry, tmp_path)(SCENE, 0).shape == (48, 64)


def test_scannet_export_bad_input_names_the_file(tmp_path):
    write_scene(tmp_path, n=3, scene=SCENE)
    write_tsv(tmp_path / "scannetv2-labels.combined.tsv", TSV_ROWS)
    bad_id = up(IDS, 16).copy()
    bad_id[10, 10] = 5000
    folder = write_label_folder(
        tmp_path / SCENE / "label-filt", {0: up(IDS, 8), 1: bad_id, 2: b"\x89PNG\r\n\x1a\n broken"}
    )
    src = make_reader({"name": "e", "kind": "scannet_export", "root": str(tmp_path)}, tmp_path).labels_2d()
    with pytest.raises(ReaderError, match=r"label-filt[/\\]0\.png: label image is 32x24 .* colour image is 64x48"):
        src(SCENE, 0)
    with pytest.raises(ReaderError, match=r"label-filt[/\\]1\.png: label ids 5000 \(1 pixels\) are not in"):
        src(SCENE, 1)
    with pytest.raises(ReaderError, match=r"label-filt[/\\]2\.png: unreadable PNG"):
        src(SCENE, 2)
    for frame in range(3):
        with pytest.raises(ReaderError) as e:
            src(SCENE, frame)
        assert str(folder / f"{frame}.png") in str(e.value)


# ----------------------------------------------------------------------------- synthetic rooms


def test_synthetic_labels_are_the_generated_label_images(tmp_path):
    """kind synthetic reads its generated label-filt zip like kind scannet; checked against the
    zip's ids mapped through a column-wise parse of the generated tsv and the 20 NYU40 ids."""
    entry = {"name": "syn", "kind": "synthetic", "root": str(tmp_path / "syn"), "scenes": 1}
    entry.update(frames_per_scene=2, depth_size=[16, 24])
    reader = make_reader(entry, tmp_path)
    assert reader.labels_2d() is None  # not generated yet
    reader.prepare()
    rows = [line.split("\t") for line in (tmp_path / "syn" / "scannetv2-labels.combined.tsv").read_text().splitlines()]
    col = {c: i for i, c in enumerate(rows[0])}
    nyu = {int(r[col["id"]]): int(r[col["nyu40id"]]) for r in rows[1:]}
    bench = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
    scene = "scene0000_00"
    with zipfile.ZipFile(tmp_path / "syn" / "scans" / scene / f"{scene}_2d-label-filt.zip") as zf:
        ids = cv2.imdecode(np.frombuffer(zf.read("label-filt/1.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    expect = np.vectorize(lambda s: bench.index(nyu[s]) if s and nyu[s] in bench else 255)(ids)
    with reader.labels_2d() as src:
        got = src(scene, 1)
    assert got.shape == (32, 48)  # the colour size, twice the depth grid
    np.testing.assert_array_equal(got, expect)
    assert len(np.unique(got)) >= 3
    # the same folder read with other generator options: stale labels are refused, not read
    with pytest.raises(ReaderError, match=r"syn: the synthetic dataset on disk was generated with other options"):
        make_reader({**entry, "seed": 5}, tmp_path).labels_2d()


# ----------------------------------------------------------------------------- SUN RGB-D

# seg.mat's names (index 1..9) and, by hand, name -> NYU40 (the 37 classes) -> ScanNet-20:
# wall 1 -> 0; Floor 2 -> 1; night_stand 32 -> none; chair 5 -> 4; garbage_bin (not one of the 37)
# -> none; table 7 -> 6; fridge 24 -> 14; shelf (shelves) 15 -> none; bathtub 36 -> 18
NAMES = ["wall", "Floor", "night_stand", "chair", "garbage_bin", "table", "fridge", "shelf", "bathtub"]
SEG = np.array([[1, 1, 2, 0], [4, 6, 7, 3], [9, 5, 8, 2]])
SEG_EXPECT = np.array([[0, 0, 1, X], [4, 6, 14, X], [18, X, X, 1]], np.uint8)
FOLDER = "kv2/kinect2data/000002_2014-05-26_14-23-37_rgbf000103-resize"


def sun_entry(root):
    return {"name": "sun", "kind": "sunrgbd", "root": str(root), "split": "all"}


@pytest.mark.parametrize("dtype", [np.float64, np.uint16])  # MATLAB's double, or an integer class
def test_sunrgbd_seg_mat_names_to_nyu40_to_scannet20(tmp_path, dtype):
    folder = tmp_path / FOLDER
    write_folder(folder, np.full((6, 8), 1500, np.uint16))  # image/<n>.jpg is 8 x 6
    write_seg_mat(folder, up(SEG).astype(dtype), NAMES)
    write_folder(tmp_path / "kv1" / "NYUdata" / "NYU0001", np.full((6, 8), 1500, np.uint16))  # no seg.mat
    reader = make_reader(sun_entry(tmp_path), tmp_path)
    with reader.labels_2d() as src:
        got = src(FOLDER, 0)
        assert got.dtype == np.uint8 and got.shape == (6, 8)
        np.testing.assert_array_equal(got, up(SEG_EXPECT))
        assert src("kv1/NYUdata/NYU0001", 0) is None  # a folder without seg.mat
        assert src(FOLDER, 1) is None  # an image folder's only frame is 0
    np.testing.assert_array_equal(default_labels(sun_entry(tmp_path), tmp_path)(FOLDER, 0), up(SEG_EXPECT))


def test_sunrgbd_bad_input_names_the_file(tmp_path):
    folder = tmp_path / FOLDER
    write_folder(folder, np.full((6, 8), 1500, np.uint16))
    src = make_reader(sun_entry(tmp_path), tmp_path).labels_2d()
    seg_mat = str(folder / "seg.mat")
    # (a) seglabel at another size than image/<n>.jpg (8 x 6)
    write_seg_mat(folder, SEG, NAMES)
    with pytest.raises(ReaderError, match=r"seg\.mat: label image is 4x3 but the frame's colour image is 8x6"):
        src(FOLDER, 0)
    # (b) an index beyond its names; a negative or fractional one
    bad = up(SEG).copy()
    bad[2, 3] = 10
    write_seg_mat(folder, bad, NAMES)
    with pytest.raises(ReaderError, match=r"seg\.mat: seglabel holds class index 10, outside its names \(9 names"):
        src(FOLDER, 0)
    bad[2, 3] = -1
    write_seg_mat(folder, bad, NAMES)
    with pytest.raises(ReaderError, match=r"seg\.mat: seglabel holds the negative index -1"):
        src(FOLDER, 0)
    write_seg_mat(folder, up(SEG) + 0.5, NAMES)
    with pytest.raises(ReaderError, match=r"seg\.mat: seglabel holds values that are not whole numbers"):
        src(FOLDER, 0)
    # (c) not a .mat file; a .mat without names
    (folder / "seg.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ReaderError, match=r"seg\.mat: unreadable \.mat file"):
        src(FOLDER, 0)
    savemat(seg_mat, {"seglabel": up(SEG)})
    with pytest.raises(ReaderError, match=r"seg\.mat: no variable 'names'"):
        src(FOLDER, 0)
    for make in (lambda: write_seg_mat(folder, SEG, NAMES), lambda: savemat(seg_mat, {"seglabel": up(SEG)})):
        make()
        with pytest.raises(ReaderError) as e:
            src(FOLDER, 0)
        assert seg_mat in str(e.value)


# ----------------------------------------------------------------------------- other kinds, sizes


def test_kinds_without_2d_labels(tmp_path):
    for kind in ("matterport", "matterport_pano"):
        entry = {"name": "m", "kind": kind, "root": str(tmp_path)}
        assert make_reader(entry, tmp_path).labels_2d() is None
        assert default_labels(entry, tmp_path) is None


def test_image_size_from_the_header(tmp_path):
    img = np.zeros((37, 53, 3), np.uint8)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    assert encoded_image_hw(jpg) == encoded_image_hw(png) == (37, 53)
    assert encoded_image_hw(b"GIF89a") == (0, 0)
    # a JPEG whose size comes after 80 kB of APP15 segments: past the first read of 64 KiB
    app = b"\xff\xef" + (40002).to_bytes(2, "big") + bytes(40000)
    p = tmp_path / "big.jpg"
    p.write_bytes(jpg[:2] + app + app + jpg[2:])
    assert cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape == (37, 53, 3)
    assert image_hw(p) == (37, 53)
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ReaderError, match=r"x\.jpg: not a readable image"):
        image_hw(tmp_path / "x.jpg")
    with pytest.raises(ReaderError, match=r"missing\.jpg: cannot read"):
        image_hw(tmp_path / "missing.jpg")
