"""The bad-input corpus: one small dataset per case, in the dataset's true on-disk format, with
exactly one defect, run through `lift3d run frames` (the stage that reads raw data).

Every case asserts its outcome, one of:
- ``Err(path, word)``: the stage fails with ONE line (no traceback) that names the broken file
  and says what is wrong (``word``), and no group that looks complete is left in frames.zarr;
- ``Skip(reason, kept)``: the stage succeeds, the frame is counted under ``reason`` in the
  group's ``skipped`` attribute and in the printed summary, and exactly the other frames
  (``kept``: (scene, source index) pairs) are in the store, once each.

The files are written by the writers the reader tests use (tests/fixtures/): ScanNet's .sens
byte layout with struct, the export's folders, SUN RGB-D's bit-rotated depth, Matterport's
.conf and panoramas. Unreadable folders need a child process that permissions can stop (see
tests/fixtures/faults.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.core.store import group_state
from lift3d.pipeline.readers.base import ReaderError
from tests.fixtures import matterport_files as MP
from tests.fixtures import matterport_pano_files as PANO
from tests.fixtures import scannet_export_files as EX
from tests.fixtures import sunrgbd_files as SUN
from tests.fixtures.config import write_config
from tests.fixtures.faults import error_line, run_lift3d
from tests.fixtures.scannet_bytes import BasicScene, RampScene, put, sens_path, set_frame_pose, set_header_depth_width

SCENE = "scene0000_00"


@dataclass
class Err:
    path: str  # the end of the broken file's path, as the message must name it
    word: str  # what is wrong, as the message must say it


@dataclass
class Skip:
    reason: str
    kept: list  # (scene, source_index) of every frame that must be in the store


def sens(root, n=4, **kw):
    """A basic .sens scene (tests/fixtures/scannet_bytes.py) of ``n`` frames; its path and size."""
    p = sens_path(root, SCENE)
    size = BasicScene.write(p, n=n, **kw)
    return p, size


# -- the cases: each writes a dataset under root and returns (kind, entry keys, expected) -----
def sens_truncated_header(root):
    sens(root, truncate_at=100)
    return "scannet", {}, Err(f"{SCENE}/{SCENE}.sens", "truncated .sens header")


def sens_truncated_mid_frame(root):
    p, size = sens(root, n=3)
    p.write_bytes(p.read_bytes()[: size - 10])
    return "scannet", {}, Err(f"{SCENE}/{SCENE}.sens", "truncated at frame 2 of 3")


def sens_corrupt_jpeg(root):
    sens(root, bad={2: "jpeg"})
    return "scannet", {}, Skip("corrupt_frame", [(SCENE, 0), (SCENE, 1), (SCENE, 3)])


def sens_corrupt_zlib_depth(root):
    put(root, RampScene.data(4, (2 * RampScene.DH, 2 * RampScene.DW), (60, 60, 31.5, 23.5), bad={1: "zlib"}), SCENE)
    return "scannet", {}, Skip("corrupt_frame", [(SCENE, 0), (SCENE, 2), (SCENE, 3)])


def sens_inf_pose(root):
    sens(root, bad={1: "pose"})
    return "scannet", {}, Skip("nonfinite_pose", [(SCENE, 0), (SCENE, 2), (SCENE, 3)])


def sens_nan_pose(root):
    put(root, RampScene.data(4, (2 * RampScene.DH, 2 * RampScene.DW), (60, 60, 31.5, 23.5), bad={3: "nan"}), SCENE)
    return "scannet", {}, Skip("nonfinite_pose", [(SCENE, 0), (SCENE, 1), (SCENE, 2)])


def sens_singular_pose(root):
    p, _ = sens(root)
    set_frame_pose(p, 2, np.zeros((4, 4)))  # finite, but no rotation: cannot place the frame
    return "scannet", {}, Skip("invalid_pose", [(SCENE, 0), (SCENE, 1), (SCENE, 3)])


def sens_empty_depth(root):
    sens(root, bad={0: "empty"})
    return "scannet", {}, Skip("empty_depth", [(SCENE, 1), (SCENE, 2), (SCENE, 3)])


def sens_zero_intrinsics(root):
    sens(root, k_depth=(0, 0, 0, 0))
    return "scannet", {}, Err(f"{SCENE}.sens", "invalid depth intrinsics")


def sens_wrong_size_depth(root):
    p, _ = sens(root, n=2)
    set_header_depth_width(p, BasicScene.DW + 1)  # the header's depth width only
    return "scannet", {}, Err(f"{SCENE}.sens", "frame 0 depth has")


EXS = EX.SCENE


def export_corrupt_depth_png(root):
    d = EX.write_scene(root, n=3)
    (d / "depth" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return "scannet_export", {}, Skip("corrupt_frame", [(EXS, 0), (EXS, 2)])


def export_wrong_size_depth_png(root):
    EX.write_scene(root, n=3, bad={2: "size"})
    return "scannet_export", {}, Err("depth/2.png", "depth is 32x26")


def export_nan_intrinsics(root):
    d = EX.write_scene(root, n=2)
    k = EX.k44(*EX.KD)
    k[0, 0] = np.nan
    np.savetxt(d / "intrinsic" / "intrinsic_depth.txt", k)
    return "scannet_export", {}, Err("intrinsic/intrinsic_depth.txt", "invalid depth intrinsics")


def export_missing_pose_file(root):
    d = EX.write_scene(root, n=3)
    (d / "pose" / "1.txt").unlink()
    return "scannet_export", {}, Err("pose/1.txt", "cannot read pose")


def export_singular_pose(root):
    d = EX.write_scene(root, n=3)
    np.savetxt(d / "pose" / "1.txt", np.zeros((4, 4)))
    return "scannet_export", {}, Skip("invalid_pose", [(EXS, 0), (EXS, 2)])


SUN_SIZE = {"image_size": [8, 12]}


def sun_missing_intrinsics(root):
    SUN.write_folder(root / "a", np.full((8, 12), 900, np.uint16))
    SUN.write_folder(root / "b", np.full((8, 12), 900, np.uint16), intrinsics=False)
    return "sunrgbd", SUN_SIZE, Err("b/intrinsics.txt", "cannot read intrinsics")


def sun_zero_intrinsics(root):
    SUN.write_folder(root / "a", np.full((8, 12), 900, np.uint16), k=(0.0, 0.0, 6.0, 4.0))
    return "sunrgbd", SUN_SIZE, Err("a/intrinsics.txt", "invalid intrinsics")


def sun_corrupt_depth_png(root):
    SUN.write_folder(root / "a", np.full((8, 12), 900, np.uint16))
    SUN.write_folder(root / "b", np.full((8, 12), 900, np.uint16))
    (root / "b" / "depth" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x07" * 30)
    return "sunrgbd", SUN_SIZE, Skip("corrupt_frame", [("a", 0)])


def sun_wrong_size_depth_png(root):
    SUN.write_folder(root / "a", np.full((8, 12), 900, np.uint16))
    import cv2

    cv2.imwrite(str(root / "a" / "depth" / "a.png"), SUN.encode_depth(np.full((9, 12), 900)))
    return "sunrgbd", SUN_SIZE, Err("a/depth/a.png", "depth is 12x9 but a.jpg is 12x8")


def pano_wrong_aspect_ratio(root):
    PANO.write_pano(root / PANO.HOUSE, "a", 0, "png", hw=(8, 12))
    return "matterport_pano", {}, Err(f"{PANO.HOUSE}/a_rgb.png", "wrong aspect ratio")


def matterport_scan_without_intrinsics(root):
    MP.write_house(root, intrinsics_first=False)
    return "matterport", {}, Err(f"{MP.HOUSE}.conf:5", "before any intrinsics_matrix (missing intrinsics)")


CASES = [
    sens_truncated_header,
    sens_truncated_mid_frame,
    sens_corrupt_jpeg,
    sens_corrupt_zlib_depth,
    sens_inf_pose,
    sens_nan_pose,
    sens_singular_pose,
    sens_empty_depth,
    sens_zero_intrinsics,
    sens_wrong_size_depth,
    export_corrupt_depth_png,
    export_wrong_size_depth_png,
    export_nan_intrinsics,
    export_missing_pose_file,
    export_singular_pose,
    sun_missing_intrinsics,
    sun_zero_intrinsics,
    sun_corrupt_depth_png,
    sun_wrong_size_depth_png,
    pano_wrong_aspect_ratio,
    matterport_scan_without_intrinsics,
]


def config_file(tmp, root, kind, extra):
    """tmp/work.yaml: the one dataset ``bad`` of ``kind`` at ``root``; returns it and the workdir."""
    return write_config(
        tmp,
        "work",
        {
            "cluster": {"n_workers": 0},
            "datasets": [{"name": "bad", "kind": kind, "root": str(root), "frame_skip": 1, "split": "all", **extra}],
        },
    )


def check(expected, code: int, out: str, wd):
    attrs = group_state(wd, "frames", "bad")
    if isinstance(expected, Err):
        assert code == 1, out[-3000:]
        line = error_line(out)
        assert "frames failed" in line and expected.path in line and expected.word in line, line
        assert attrs is None or not attrs.get("complete")  # nothing that looks complete
        return
    assert code == 0, out[-3000:]
    import zarr

    assert attrs["complete"] and attrs["skipped"] == {expected.reason: 1}, attrs.get("skipped")
    assert f"{{'{expected.reason}': 1}}" in out  # the stage summary shows the count and reason
    g = zarr.open_group(str(wd / "frames.zarr" / "bad"), mode="r")
    got = [(attrs["scenes"][s], int(i)) for s, i in zip(g["scene_index"][...], g["source_index"][...])]
    assert got == expected.kept


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    kind, extra, expected = case(root)
    cfg, wd = config_file(tmp_path, root, kind, extra)
    res = CliRunner().invoke(main, ["run", "frames", "-c", str(cfg)])
    check(expected, res.exit_code, res.output, wd)


# -- unreadable folders: a scene the stage cannot read must stop it, never vanish silently -----
def unreadable_scannet_scene(root):
    for s in ("scene0000_00", "scene0001_00"):
        BasicScene.write(sens_path(root, s), n=2)
    (root / "scans" / "scene0001_00").chmod(0)
    return "scannet", {}, Err("scans/scene0001_00", "unreadable folder")


def unreadable_sunrgbd_folder(root):
    SUN.write_folder(root / "kv1" / "a", np.full((8, 12), 900, np.uint16))
    SUN.write_folder(root / "kv2" / "b", np.full((8, 12), 900, np.uint16))
    (root / "kv2").chmod(0)
    return "sunrgbd", SUN_SIZE, Err("kv2", "unreadable folder")


@pytest.mark.parametrize(
    "case",
    [unreadable_scannet_scene, unreadable_sunrgbd_folder],
    ids=["unreadable_scannet_scene", "unreadable_sunrgbd_folder"],
)
def test_unreadable_folder_is_an_error_not_a_silent_loss(case, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    kind, extra, expected = case(root)
    cfg, wd = config_file(tmp_path, root, kind, extra)
    res = run_lift3d(["run", "frames", "-c", cfg], unprivileged=True)
    check(expected, res.returncode, res.out, wd)


# -- labels: read by fine-tuning and evaluation, not by a preprocessing stage ----------------
def test_missing_label_file_names_it(tmp_path):
    from lift3d.pipeline.readers.scannet_labels import read_labelled_mesh
    from lift3d.pipeline.synthetic import write_ply

    d = tmp_path / SCENE
    d.mkdir()
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    write_ply(d / f"{SCENE}_vh_clean_2.ply", xyz, np.full((3, 3), 90, np.uint8), np.array([[0, 1, 2]]), None)
    with pytest.raises(ReaderError, match=rf"{SCENE}_vh_clean_2\.labels\.ply: cannot read: No such file"):
        read_labelled_mesh(d)
    # with the label file present, the same folder reads (the error above was the missing file)
    write_ply(
        d / f"{SCENE}_vh_clean_2.labels.ply",
        xyz,
        np.full((3, 3), 90, np.uint8),
        np.array([[0, 1, 2]]),
        np.array([1, 5, 39]),
    )
    assert read_labelled_mesh(d)[2].tolist() == [1, 5, 39]
