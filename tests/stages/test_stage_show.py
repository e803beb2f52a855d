"""``lift3d show``: the PNG is written and non-trivial, the PLY parses back to the same points,
teacher colouring uses the cell that covers each point's pixel."""

import numpy as np
import pytest
import zarr

from lift3d.core import config as C
from lift3d.core.store import lineage, open_group
from lift3d.pipeline import points as P
from lift3d.pipeline.show import show, splat, teacher_cells
from tests.fixtures.config import points_cfg
from tests.fixtures.ply import parse_ply
from tests.fixtures.stores import H, W, write_tiny_frames


def fake_teacher(cfg, n, hs=8, ws=10, k=2):
    """teacher.zarr/<teacher>/tiny with a soft_labels/index whose top class = 3 * cell row + cell col % 3."""
    wd = C.workdir(cfg)
    frames_lineage = open_group(wd, "frames", "tiny").attrs["lineage_sha256"]
    g = zarr.open_group(str(wd / "teacher.zarr" / cfg["teacher"]["name"] / "tiny"), mode="w")
    i, j = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
    top = (3 * i + j % 3).astype(np.uint16)
    index = np.stack([top, top + 100], 0)[None].repeat(n, 0)
    g.require_group("soft_labels").create_array("index", data=index, chunks=(1, k, hs, ws))
    g.attrs.update(
        {
            "complete": True,
            "schema_version": 1,
            "config_sha256": "fake",
            "lineage_sha256": lineage("fake", frames_lineage),
            "classes": [f"class{c}" for c in range(200)],
        }
    )
    return top


def check_png(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 100


def test_show_png_and_ply_round_trip(tmp_path):
    cfg = points_cfg(tmp_path / "work")
    write_tiny_frames(cfg)
    P.run(cfg)
    fake_teacher(cfg, 5)
    g = open_group(C.workdir(cfg), "points", "tiny")
    for frame in (0, 3):  # pinhole, panorama
        png, ply = tmp_path / f"f{frame}.png", tmp_path / f"f{frame}.ply"
        res = show(cfg, "tiny", frame, png, ply=ply)
        assert res["source"] == "points.zarr" and res["teacher"] == cfg["teacher"]["name"]
        check_png(png)
        coords, colors, _ = P.frame_points(g, frame)
        assert res["points"] == len(coords) > 100
        v = parse_ply(ply)
        np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), coords)
        np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), colors)
    show(cfg, "tiny", 0, tmp_path / "a.png", ply=tmp_path / "a.ply", ply_ascii=True)
    v = parse_ply(tmp_path / "a.ply")
    coords, colors, _ = P.frame_points(g, 0)
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32), coords)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), colors)


def test_show_without_points_lifts_on_the_fly_and_checks_the_frame(tmp_path):
    cfg = points_cfg(tmp_path / "work")
    write_tiny_frames(cfg)
    res = show(cfg, "tiny", 3, tmp_path / "p.png")
    assert res["source"] == "lifted now" and res["teacher"] is None and res["points"] > 100
    check_png(tmp_path / "p.png")
    with pytest.raises(IndexError, match="5 frames"):
        show(cfg, "tiny", 5, tmp_path / "x.png")


def test_teacher_cells_cover_the_pixel():
    """Cell (i, j) of an h x w map covers the pixels nearest its centre (i + 0.5) H / h - 0.5."""
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pixel = np.stack([rows.ravel(), cols.ravel()], 1)
    for hs, ws in ((8, 10), (4, 5), (32, 40)):
        i, j = teacher_cells(pixel, H, W, hs, ws)
        ci = (np.arange(hs) + 0.5) * H / hs - 0.5
        cj = (np.arange(ws) + 0.5) * W / ws - 0.5
        np.testing.assert_array_equal(i, np.abs(pixel[:, :1] - ci[None]).argmin(1))
        np.testing.assert_array_equal(j, np.abs(pixel[:, 1:] - cj[None]).argmin(1))


def test_splat_keeps_the_nearest_point():
    coords = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.6, 0.0, 2.0]])
    vals = np.array([[1.0], [2.0], [3.0], [4.0]])
    img = splat(coords, vals, np.eye(3), np.zeros(3), (10.0, 10.0, 4.0, 4.0), (9, 9), radius=0, background=0)
    assert img[4, 4, 0] == 2.0 and img[4, 7, 0] == 4.0  # 0.6 m at z = 2: 3 px right
    assert (img > 0).sum() == 2
