"""The teacher stage (pipeline/teacher.py), `lift3d eval teacher`, and nested arrays in parts.

A tiny frames group (6 frames of 64 x 80 from scikit-image's photos, two scenes) is written
directly with GroupWriter / PartWriter; the stage runs in-process (cluster.n_workers = 0)
with the default EfficientNet-Lite0 teacher at 64 x 96. Outputs are checked against an
independently built teacher called directly on the same frames.
"""

import copy
import logging
import zipfile

import cv2
import numpy as np
import pytest
import torch
import zarr

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.core.classmaps import ade20k150_names, scannet20_names
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group
from lift3d.pipeline import teacher as TS
from lift3d.pipeline.frames import templates as frame_templates
from lift3d.pipeline.readers.common import nearest_index
from lift3d.pipeline.teachers.evaluate import eval_teacher
from lift3d.pipeline.teachers.registry import build_teacher
from tests.fixtures.config import TEACHER_INPUT as INPUT
from tests.fixtures.config import teacher_cfg
from tests.fixtures.stores import write_frames_group

H, W = 64, 80


def images() -> np.ndarray:
    from skimage import data

    out = []
    for img in (data.chelsea(), data.coffee(), data.astronaut()):
        full = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
        crop = cv2.resize(img[: img.shape[0] // 2, : img.shape[1] // 2], (W, H), interpolation=cv2.INTER_AREA)
        out += [full, crop]
    return np.stack(out).astype(np.uint8)  # (6, H, W, 3)


RGB = images()


def write_frames(cfg, rgb=RGB, scenes=("scene0000_00", "scene0001_00"), complete=True):
    """A frames group as the frames stage would write it (2 scenes, 3 frames each)."""
    m = len(rgb) // len(scenes)
    return write_frames_group(
        cfg,
        {
            scene: {
                "rgb": rgb[si * m : (si + 1) * m],
                "depth": np.full((m, H, W), 1500, np.uint16),
                "intrinsics": np.tile(np.array([60, 60, W / 2 - 0.5, H / 2 - 0.5], np.float32), (m, 1)),
                "pose": np.tile(np.eye(4, dtype=np.float32), (m, 1, 1)),
                "projection": np.zeros(m, np.uint8),
                "source_index": np.arange(m, dtype=np.int32) * 10,
            }
            for si, scene in enumerate(scenes)
        },
        complete=complete,
    )


def tgroup(cfg):
    g = S.groups(cfg, "teacher")[0]
    return zarr.open_group(str(C.workdir(cfg) / "teacher.zarr" / g.path), mode="r")


def arrays(grp) -> dict:
    return {
        n: grp[n][...]
        for n in ("features", "soft_labels/prob", "soft_labels/index")
        + tuple(n for n in ("features_flip", "soft_labels/prob_flip", "soft_labels/index_flip") if n in grp)
    }


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("efficientnet_lite0", input_size=INPUT)


@pytest.fixture(scope="module")
def reference(teacher):
    """The teacher called directly, one frame at a time: float32 features and probabilities."""
    f, p = zip(*(teacher.forward(RGB[i : i + 1]) for i in range(len(RGB))))
    return torch.cat(f).numpy(), torch.cat(p).numpy()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One clean run (shards of 2 frames) whose store the other tests compare with."""
    mp = pytest.MonkeyPatch()
    mp.setattr(TS, "SHARD_FRAMES", 2)
    cfg = teacher_cfg(tmp_path_factory.mktemp("clean"))
    write_frames(cfg)
    rows = TS.run(cfg)
    mp.undo()
    return cfg, rows, arrays(tgroup(cfg)), dict(tgroup(cfg).attrs)


def test_shapes_dtypes_attrs_and_summary(clean, teacher):
    cfg, rows, arr, attrs = clean
    assert arr["features"].shape == (6, 320, 2, 3) and arr["features"].dtype == np.float16
    assert arr["soft_labels/prob"].shape == (6, 5, 2, 3) and arr["soft_labels/prob"].dtype == np.float16
    assert arr["soft_labels/index"].shape == (6, 5, 2, 3) and arr["soft_labels/index"].dtype == np.uint16
    g = tgroup(cfg)
    assert sorted(g.group_keys()) == ["soft_labels"]  # a real subgroup, no flattened names
    assert sorted(g.array_keys()) == ["features"] and "scene_index" not in g
    assert g["features"].chunks == (1, 320, 2, 3) and g["soft_labels/index"].chunks == (1, 5, 2, 3)
    assert S.groups(cfg, "teacher")[0].path == "efficientnet_lite0/tiny"
    assert attrs["complete"] and attrs["teacher"] == "efficientnet_lite0"
    assert attrs["weights_sha256"] == teacher.weights_sha256 and len(attrs["weights_sha256"]) == 64
    assert attrs["input_size"] == INPUT and attrs["stride"] == 32 and attrs["mean"] == [0.5] * 3
    assert attrs["normalisation"]["std"] == [0.5] * 3 and len(attrs["classes"]) == 1000
    assert attrs["top_k"] == 5 and attrs["n_frames"] == 6 and attrs["flip_pass"] is False
    assert attrs["shards"] == ["shard-000000", "shard-000001", "shard-000002"]
    assert attrs["config_sha256"] == S.groups(cfg, "teacher")[0].config_sha256
    assert attrs["lineage_sha256"] == S.groups(cfg, "teacher")[0].lineage_sha256
    open_group(
        C.workdir(cfg), "teacher", "efficientnet_lite0/tiny", expect_lineage=S.groups(cfg, "teacher")[0].lineage_sha256
    )
    assert S.stage_status(cfg, "teacher")[0] == "done"
    (row,) = rows
    assert row["status"] == "written" and row["frames"] == row["processed"] == 6 and row["images_per_s"] > 0
    assert row["feature_bytes_per_frame"] == 320 * 2 * 3 * 2
    assert row["soft_label_bytes_per_frame"] == 5 * 2 * 3 * 4
    assert row["leftover_mean"] == attrs["topk_leftover_mass"]["mean"]


def test_features_and_soft_labels_match_direct_teacher(clean, reference):
    _, _, arr, attrs = clean
    feats, probs = reference
    np.testing.assert_allclose(arr["features"].astype(np.float32), feats, rtol=2e-3, atol=2e-3)
    prob, idx = arr["soft_labels/prob"].astype(np.float32), arr["soft_labels/index"].astype(np.int64)
    # the stored probabilities are the teacher's at the stored classes, most probable first
    gathered = np.take_along_axis(probs, idx, axis=1)
    np.testing.assert_allclose(prob, gathered, rtol=2e-3, atol=1e-4)
    assert np.all(np.diff(gathered, axis=1) <= 1e-6)
    # ... and they are the top 5: every class left out is no more probable than the 5th
    rest = probs.copy()
    np.put_along_axis(rest, idx, -1.0, axis=1)
    assert np.all(rest.max(1) <= gathered[:, -1] + 1e-6)
    np.testing.assert_array_equal(idx[:, 0], probs.argmax(1))
    # renormalised over the k, each cell sums to 1; the leftover mass is what the top-5 miss
    renorm = prob / prob.sum(1, keepdims=True)
    np.testing.assert_allclose(renorm.sum(1), 1.0, atol=1e-5)
    left = 1.0 - np.sort(probs, axis=1)[:, ::-1][:, :5].sum(1)
    assert attrs["topk_leftover_mass"]["mean"] == pytest.approx(left.mean(), abs=1e-5)
    assert attrs["topk_leftover_mass"]["max"] == pytest.approx(left.max(), abs=1e-5)
    assert 0 < left.mean() < 1


def test_rerun_is_a_noop(clean):
    cfg = clean[0]
    path = C.workdir(cfg) / "teacher.zarr" / "efficientnet_lite0" / "tiny" / "features" / "zarr.json"
    before = path.stat().st_mtime_ns
    (row,) = TS.run(cfg)
    assert row["status"] == "up to date" and row["processed"] == 0 and row["frames"] == 6
    assert path.stat().st_mtime_ns == before
    # a setting of another stage changes nothing here
    cfg2 = copy.deepcopy(cfg)
    cfg2["pretrain"]["lr"] = 0.5
    assert TS.run(cfg2)[0]["status"] == "up to date"


def test_killed_shard_is_redone_and_store_equals_clean_run(clean, tmp_path, monkeypatch):
    monkeypatch.setattr(TS, "SHARD_FRAMES", 2)
    cfg = teacher_cfg(tmp_path)
    write_frames(cfg)

    class Kill(Exception):
        pass

    class Killed(PartWriter):  # dies while shard 1 is half written (its part is never marked done)
        def finish(self, templates, **attrs):
            if attrs.get("shard") == "shard-000001":
                self.flush()
                raise Kill("killed")
            return super().finish(templates, **attrs)

    monkeypatch.setattr(TS, "PartWriter", Killed)
    with pytest.raises(Kill):
        TS.run(cfg)
    g = S.groups(cfg, "teacher")[0]
    w = GroupWriter(C.workdir(cfg), "teacher", g.path, g.config, g.upstream.config_sha256, g.upstream.lineage_sha256)
    assert w.part_done("shard-000000") and not w.part_done("shard-000001")
    assert w.part_path("shard-000001").exists() and not w.path.exists()
    monkeypatch.setattr(TS, "PartWriter", PartWriter)
    (row,) = TS.run(cfg)
    assert row["status"] == "written" and row["processed"] == 4  # shard 0 was kept
    got, ref = arrays(tgroup(cfg)), clean[2]
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert dict(tgroup(cfg).attrs)["topk_leftover_mass"] == pytest.approx(clean[3]["topk_leftover_mass"])


def test_changed_config_rebuilds_and_flip_pass(tmp_path, teacher, reference, caplog):
    cfg = teacher_cfg(tmp_path, top_k=3)
    write_frames(cfg)
    TS.run(cfg)
    assert tgroup(cfg)["soft_labels/prob"].shape == (6, 3, 2, 3)
    cfg = teacher_cfg(tmp_path, flip_pass=True)
    cfg["rebuild"] = True  # a complete store of another configuration is replaced only when asked
    with caplog.at_level(logging.INFO, logger="lift3d"):
        (row,) = TS.run(cfg)
    assert "another configuration" in caplog.text and "top_k: 3 -> 5" in caplog.text
    assert "removing" in caplog.text
    assert row["status"] == "written" and row["processed"] == 6
    g = tgroup(cfg)
    assert g.attrs["top_k"] == 5 and g.attrs["flip_pass"] is True and "flip" in g.attrs["flip_convention"]
    arr = arrays(g)
    assert arr["soft_labels/prob"].shape == (6, 5, 2, 3)  # only the new configuration's rows
    np.testing.assert_allclose(arr["features"].astype(np.float32), reference[0], rtol=2e-3, atol=2e-3)
    f, p = teacher.forward(np.ascontiguousarray(np.flip(RGB, axis=2)))
    np.testing.assert_allclose(arr["features_flip"].astype(np.float32), f.numpy(), rtol=2e-3, atol=2e-3)
    v, i = torch.topk(p, 5, dim=1)
    np.testing.assert_allclose(arr["soft_labels/prob_flip"].astype(np.float32), v.numpy(), rtol=2e-3, atol=1e-4)
    assert np.mean(arr["soft_labels/index_flip"][:, 0] == i[:, 0].numpy()) == 1.0
    assert arr["soft_labels/index_flip"].dtype == np.uint16
    assert row["feature_bytes_per_frame"] == 2 * 320 * 2 * 3 * 2


def test_stale_or_incomplete_frames_are_refused(tmp_path):
    cfg = teacher_cfg(tmp_path)
    with pytest.raises(StoreError, match="lift3d run frames"):
        TS.run(cfg)  # no frames group at all
    write_frames(cfg, complete=False)
    with pytest.raises(StoreError, match="not marked complete.*lift3d run frames"):
        TS.run(cfg)
    write_frames(cfg)
    cfg["datasets"][0]["frame_skip"] = 2  # the frames group is now from another config
    with pytest.raises(StoreError, match="another configuration.*lift3d run frames"):
        TS.run(cfg)


def test_gpu_path_is_import_safe():
    assert TS.resolve_device("cpu") == "cpu"
    assert TS.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            TS.resolve_device("cuda")
    assert TS.shard_ranges(0, 64) == [("shard-000000", 0, 0)]
    assert TS.shard_ranges(130, 64)[-1] == ("shard-000002", 128, 130)


def test_store_nested_array_names(tmp_path):
    """lift3d.core.store: parts may hold arrays in subgroups ("soft_labels/prob"); commit keeps the
    layout, and flat arrays / scene_index behave as before."""
    w = GroupWriter(tmp_path, "teacher", "t/d", {"x": 1})
    w.prepare_parts()
    for s, rows in (("b", 3), ("a", 2)):
        pw = PartWriter(w.part_path(s), chunk_rows={"sub/p": 2})
        pw.append(
            **{
                "flat": np.arange(rows, dtype=np.int32) + (10 if s == "b" else 0),
                "sub/p": np.full((rows, 2), ord(s), np.float16),
                "scene_index": np.zeros(rows, np.int32),
            }
        )
        pw.finish({})
    w.commit(["b", "a"], attrs={})
    g = zarr.open_group(str(w.path), mode="r")
    assert sorted(g.array_keys()) == ["flat", "scene_index"] and list(g.group_keys()) == ["sub"]
    np.testing.assert_array_equal(g["flat"][...], [0, 1, 10, 11, 12])
    np.testing.assert_array_equal(g["sub/p"][:, 0], [ord("a")] * 2 + [ord("b")] * 3)
    np.testing.assert_array_equal(g["scene_index"][...], [0, 0, 1, 1, 1])
    assert g["sub/p"].chunks == (2, 2) and g.attrs["complete"]


# ----------------------------------------------------------------------------- eval teacher


def test_nearest_cell_mapping():
    # 4 cells over 8 pixels: pixels 0,1 -> cell 0 ... ; 3 cells over 8 pixels: centres at 1.17, 3.5, 5.83
    np.testing.assert_array_equal(nearest_index(8, 4), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(nearest_index(8, 3), [0, 0, 0, 1, 1, 2, 2, 2])
    # 6 -> 3: each destination centre falls on a source pixel boundary; the later pixel wins
    np.testing.assert_array_equal(nearest_index(3, 6), [1, 3, 5])


def test_eval_teacher_hand_made_case(tmp_path):
    """2 frames of 4 x 6 pixels, 2 x 3 cells of an ADE20K-150 teacher; the label images are at
    twice that size (8 x 12) with ScanNet ids. Known answer computed by hand below."""
    cfg = teacher_cfg(tmp_path, name="efficientnet_lite0")
    root = tmp_path / "scannet"
    cfg["datasets"][0].update({"kind": "scannet", "root": str(root)})
    del cfg["datasets"][0]["scenes"], cfg["datasets"][0]["seed"]
    # frames group: 2 frames, scene "scene0000_00", source indices 0 and 10
    fg = S.groups(cfg, "frames")[0]
    fw = GroupWriter(C.workdir(cfg), "frames", fg.path, fg.config)
    fw.prepare_parts()
    pw = PartWriter(fw.part_path("scene0000_00"))
    pw.append(
        rgb=np.zeros((2, 4, 6, 3), np.uint8),
        depth=np.zeros((2, 4, 6), np.uint16),
        intrinsics=np.zeros((2, 4), np.float32),
        pose=np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)),
        projection=np.zeros(2, np.uint8),
        scene_index=np.zeros(2, np.int32),
        source_index=np.array([0, 10], np.int32),
    )
    pw.finish(frame_templates(4, 6))
    fw.commit(["scene0000_00"], attrs={})
    # teacher group: ADE classes; 0 wall (->ScanNet-20 0 wall), 3 floor (-> 1 floor), 2 sky (-> none)
    tg = S.groups(cfg, "teacher")[0]
    tw = GroupWriter(
        C.workdir(cfg), "teacher", tg.path, tg.config, tg.upstream.config_sha256, tg.upstream.lineage_sha256
    )
    tw.prepare_parts()
    top1 = np.array(
        [
            [[0, 0, 3], [3, 3, 2]],  # frame 0
            [[0, 0, 0], [0, 0, 0]],
        ],
        np.uint16,
    )  # frame 1: all wall
    index = np.stack([top1, np.full_like(top1, 7)], axis=1)  # (2, k=2, 2, 3); 2nd choice (bed) has no mass
    prob = np.stack([np.ones(top1.shape, np.float16), np.zeros(top1.shape, np.float16)], axis=1)
    pw = PartWriter(tw.part_path("shard-000000"))
    pw.append(**{"soft_labels/index": index, "soft_labels/prob": prob})
    pw.finish({})
    tw.commit(["shard-000000"], attrs={"classes": ade20k150_names()})
    # ground truth: ScanNet id 1 = wall (nyu 1), 2 = floor (nyu 2), 5 = unknown (nyu 0 -> ignored)
    (root / "scans" / "scene0000_00").mkdir(parents=True)
    (root / "scannetv2-labels.combined.tsv").write_text(
        "id\traw_category\tcategory\tcount\tnyu40id\n1\twall\twall\t1\t1\n2\tfloor\tfloor\t1\t2\n5\tx\tx\t1\t0\n"
    )
    gt0 = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 5, 5], [2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 1, 1]], np.uint16)
    with zipfile.ZipFile(root / "scans" / "scene0000_00" / "scene0000_00_2d-label-filt.zip", "w") as zf:
        zf.writestr("label-filt/0.png", cv2.imencode(".png", np.kron(gt0, np.ones((2, 2), np.uint16)))[1].tobytes())
        # frame 10 has no label image
    res = eval_teacher(cfg, "tiny")
    # frame 0 predictions at stored pixels (cells are 2 x 2 pixels), sampled bilinearly: pixel row
    # r takes cell rows with weights (1, 0), (.75, .25), (.25, .75), (0, 1), columns likewise
    # (col 3: .75 cell 1 + .25 cell 2; col 4: .25 + .75); e.g. row 1 col 3 holds wall .5625,
    # floor .375, none .0625 -> wall; row 2 col 4 floor .375, none .5625 -> none:
    #   rows 0-1: W W W W F F      rows 2-3: F F F F none none
    # wall GT pixels: row 0 (6), row 1 cols 0,1 (2), row 3 cols 4,5 (2) = 10
    #   predicted wall there: row 0 cols 0-3 (4) + row 1 cols 0-1 (2) = 6 = TP(wall)
    #   wall predicted on non-wall labelled pixels: row 1 cols 2,3 (floor) = 2 -> IoU = 6 / (10 + 2) = 0.5
    # floor GT: row 1 cols 2,3 (2) + row 2 (6) + row 3 cols 0-3 (4) = 12; TP: row 2 cols 0-3, row 3 cols 0-3 = 8
    #   floor predicted elsewhere: row 0 cols 4,5 (wall) = 2 (row 1 cols 4,5 are ignored) -> 8 / (12 + 2) = 4/7
    assert res["evaluated"] and res["frames"] == 1 and res["frames_without_labels"] == 1
    assert res["labelled_pixels"] == 22 and res["classes_present"] == 2
    names = scannet20_names()
    assert res["iou"] == pytest.approx({names[0]: 0.5, names[1]: 4 / 7})
    assert res["miou"] == pytest.approx((0.5 + 4 / 7) / 2)
    # predicted "none" (sky) on labelled pixels: row 2 cols 4,5 (floor) + row 3 cols 4,5 (wall) = 4
    assert res["coverage"] == pytest.approx(18 / 22)


def test_eval_teacher_without_labels(tmp_path):
    cfg = teacher_cfg(tmp_path, shard_frames=64)
    write_frames(cfg)  # stores written directly: no raw dataset, so no 2D labels
    TS.run(cfg)
    res = eval_teacher(cfg, "tiny")
    assert res["evaluated"] is False and "no ground-truth" in res["reason"]


def test_eval_teacher_refuses_missing_stores_before_looking_for_labels(tmp_path):
    with pytest.raises(StoreError, match="lift3d run frames"):
        eval_teacher(teacher_cfg(tmp_path), "tiny")


def test_pca_channel_reduction_against_numpy_svd(tmp_path, reference):
    """teacher.pca_channels: the stored features are W (f - mu) for the top principal directions
    of the fit sample (here all 6 frames), checked against numpy's SVD of the reference features;
    the reported error is the residual energy computed here from the reference."""
    cfg = teacher_cfg(tmp_path, pca_channels=8, pca_fit_frames=6)
    write_frames(cfg)
    (row,) = TS.run(cfg)
    g = tgroup(cfg)
    feats_ref = reference[0]  # (6, 320, 2, 3) float32
    x = feats_ref.transpose(0, 2, 3, 1).reshape(-1, 320).astype(np.float64)
    mu = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    np.testing.assert_allclose(g["pca/mean"][...], mu, rtol=1e-4, atol=1e-4)
    w = g["pca/components"][...].astype(np.float64)
    assert w.shape == (8, 320)
    np.testing.assert_allclose(w @ w.T, np.eye(8), atol=1e-4)  # orthonormal rows
    np.testing.assert_allclose(np.abs(np.sum(w * vt[:8], axis=1)), 1.0, atol=1e-3)  # same directions
    z = np.einsum("kc,nchw->nkhw", w, feats_ref - mu[None, :, None, None])
    assert g["features"].shape == (6, 8, 2, 3) and g["features"].dtype == np.float16
    np.testing.assert_allclose(g["features"][...].astype(np.float64), z, rtol=2e-3, atol=2e-2)
    red = g.attrs["features_reduction"]
    resid = ((x - mu) ** 2).sum() - (sv[:8] ** 2).sum()
    assert red["channels_in"] == 320 and red["channels"] == 8 and red["fit_frames"] == 6
    assert red["relative_error"] == pytest.approx(resid / (x**2).sum(), rel=1e-3)
    assert red["unexplained_variance"] == pytest.approx(resid / ((x - mu) ** 2).sum(), rel=1e-3)
    assert red["explained_variance_fit"] == pytest.approx(1 - red["unexplained_variance"], abs=1e-4)
    assert g.attrs["features_shape"] == [8, 2, 3] and row["feature_bytes_per_frame"] == 8 * 2 * 3 * 2
    assert g.attrs["channels"] == 8
    # rebuilding from the stored arrays as the attribute says gives the map back up to the residual
    rebuilt = g["pca/mean"][...][None, :, None, None] + np.einsum("kc,nkhw->nchw", w, g["features"][...])
    err = ((rebuilt - feats_ref) ** 2).sum() / (feats_ref**2).sum()
    assert err == pytest.approx(red["relative_error"], rel=0.05, abs=1e-5)


def test_pca_channels_must_be_fewer_than_the_teachers(tmp_path):
    cfg = teacher_cfg(tmp_path, pca_channels=320)
    write_frames(cfg)
    with pytest.raises(ValueError, match="pca_channels must be between 1 and 319"):
        TS.run(cfg)


def stop_after_first_shard(cfg, monkeypatch) -> None:
    """Run the stage as a run stopped after writing its first shard's part would leave it."""
    real = TS.process_shards

    def first_shard_only(teacher, rgb, shards, *a, **k):
        real(teacher, rgb, shards[:1], *a, **k)
        raise RuntimeError("stopped after one shard")

    monkeypatch.setattr(TS, "process_shards", first_shard_only)
    with pytest.raises(RuntimeError, match="stopped"):
        TS.run(cfg)
    monkeypatch.setattr(TS, "process_shards", real)


def test_pca_resume_reuses_the_fitted_projection(tmp_path, monkeypatch):
    """A run stopped after its first shard keeps its fitted projection beside the parts; the
    re-run does not fit again and gives the store of one clean run."""
    from lift3d.pipeline.teachers import pca as feature_pca

    clean_cfg = teacher_cfg(tmp_path / "clean", pca_channels=4, pca_fit_frames=4)
    write_frames(clean_cfg)
    TS.run(clean_cfg)
    want = arrays(tgroup(clean_cfg))

    cfg = teacher_cfg(tmp_path / "resumed", pca_channels=4, pca_fit_frames=4)
    write_frames(cfg)
    stop_after_first_shard(cfg, monkeypatch)
    monkeypatch.setattr(feature_pca, "fit_teacher", lambda *a, **k: pytest.fail("fitted twice"))
    TS.run(cfg)
    got = arrays(tgroup(cfg))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(tgroup(cfg)["pca/components"][...], tgroup(clean_cfg)["pca/components"][...])


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (the teacher's GPU path: bf16 autocast, channels-last, pinned "
    "memory, copies overlapped with compute); the CPU path is tested above",
)
def test_gpu_path_agrees_with_the_float32_cpu_reference(tmp_path, reference):
    """The GPU path in bf16 against the teacher called in float32 on the CPU: features within a
    few per cent, the same top class on most cells, the channel reduction on the device too."""
    cfg = teacher_cfg(tmp_path, device="cuda", pca_channels=8, pca_fit_frames=6)
    write_frames(cfg)
    (row,) = TS.run(cfg)
    g = tgroup(cfg)
    assert g.attrs["device"] == "cuda" and g.attrs["precision"] == "bf16 autocast"
    feats_ref, probs_ref = reference
    x = feats_ref.transpose(0, 2, 3, 1).reshape(-1, 320).astype(np.float64)
    w, mu = g["pca/components"][...].astype(np.float64), g["pca/mean"][...].astype(np.float64)
    z_ref = np.einsum("kc,nchw->nkhw", w, feats_ref - mu[None, :, None, None])
    z = g["features"][...].astype(np.float64)
    assert np.linalg.norm(z - z_ref) / np.linalg.norm(z_ref) < 0.05
    assert np.abs(mu - x.mean(0)).max() < 0.05 * np.abs(x).max()
    agree = (g["soft_labels/index"][:, 0].astype(np.int64) == probs_ref.argmax(1)).mean()
    assert agree >= 0.8, f"top-1 agreement with the float32 reference {agree:.2f}"
    assert row["processed"] == 6


def test_cluster_workers_resolve_the_device_and_take_the_gpu_resource(tmp_path):
    """On a scheduler the workers resolve teacher.device themselves (auto -> cpu here) and each
    shard takes one unit of cluster.gpu_resource: a worker without it runs none of them. Without
    any worker that declares it, a clear error instead of tasks that wait forever."""
    import copy

    from dask.distributed import Client, LocalCluster

    from lift3d.core.cluster import TaskError

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1}, dashboard_address=None
    ) as lc:
        lc.new_spec = copy.deepcopy(lc.new_spec)
        lc.new_spec["options"].pop("resources", None)  # a second worker with no GPU
        lc.scale(2)
        with Client(lc) as c:
            c.wait_for_workers(2)
        with_gpu = [w for w in lc.workers.values() if w.state.total_resources.get("GPU")]
        without = [w for w in lc.workers.values() if not w.state.total_resources.get("GPU")]
        assert len(with_gpu) == len(without) == 1
        before = {id(w): w.state.executed_count for w in lc.workers.values()}
        cfg = teacher_cfg(tmp_path / "gpu", device="auto")
        cfg["cluster"].update({"scheduler": lc.scheduler_address, "gpu_resource": "GPU"})
        write_frames(cfg)
        (row,) = TS.run(cfg)
        assert row["processed"] == 6 and tgroup(cfg).attrs["device"] == "cpu"
        assert without[0].state.executed_count == before[id(without[0])]  # no shard ran there
        assert with_gpu[0].state.executed_count - before[id(with_gpu[0])] == 3  # 3 shards of 2 frames
        want = arrays(tgroup(cfg))
        cfg2 = teacher_cfg(tmp_path / "none", device="auto")
        cfg2["cluster"].update({"scheduler": lc.scheduler_address, "gpu_resource": "TPU"})
        write_frames(cfg2)
        with pytest.raises(TaskError, match=r"need worker resources \{'TPU': 1\}, but no worker has them"):
            TS.run(cfg2)
    clean = teacher_cfg(tmp_path / "clean", device="cpu")
    write_frames(clean)
    TS.run(clean)
    for name, a in arrays(tgroup(clean)).items():
        np.testing.assert_array_equal(want[name], a, err_msg=name)


def test_shards_from_different_devices_are_never_committed_together(tmp_path, monkeypatch):
    cfg = teacher_cfg(tmp_path)
    write_frames(cfg)
    stop_after_first_shard(cfg, monkeypatch)
    g = S.groups(cfg, "teacher")[0]
    w = GroupWriter(C.workdir(cfg), "teacher", g.path, g.config, upstream_lineage=g.upstream.lineage_sha256)
    zarr.open_group(str(w.part_path("shard-000000")), mode="a").attrs["device"] = "cuda"  # as a GPU worker would
    with pytest.raises(
        StoreError,
        match=r"shards ran on different devices \(cpu: shard-000001, shard-000002; "
        r"cuda: shard-000000\); set teacher.device to cpu or cuda explicitly",
    ):
        TS.run(cfg)
    assert not (C.workdir(cfg) / "teacher.zarr" / g.path / "zarr.json").exists()


def test_pca_fit_sample_too_small_is_a_clear_error(tmp_path):
    cfg = teacher_cfg(tmp_path, pca_channels=8, pca_fit_frames=1)  # 1 frame = 6 vectors < 9
    write_frames(cfg)
    with pytest.raises(
        ValueError,
        match=r"pca_channels 8: the fit sample has only 6 feature vectors; "
        r"raise teacher.pca_fit_frames",
    ):
        TS.run(cfg)
