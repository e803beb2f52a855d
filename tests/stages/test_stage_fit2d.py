"""Stage fit2d and the fitted teacher: a kill and resume gives the clean run's network, the
teacher stage caches its whole ScanNet-20 distribution (checked against the network run
directly), a corpus that shares a room with the 3D data is refused, and weights that do not fit
are refused naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from lift3d.core.classmaps import scannet20_names
from lift3d.core.errors import Fit2dError, TeacherError
from lift3d.core.graph import run_stage, stage_status
from lift3d.core.store import store_path
from lift3d.nets.backbones2d import efficientnet_lite0
from lift3d.nets.pspnet import FIT2D_MODEL_KIND, Seg2D
from lift3d.pipeline.teachers.evaluate import eval_teacher
from lift3d.pipeline.teachers.registry import build_teacher
from lift3d.train import fit2d
from tests.fixtures.config import make_cfg, tiny_synthetic

torch.set_num_threads(1)


def fit_cfg(wd, corpus_seed: int = 5, **fit):
    room = dict(frames_per_scene=8, depth_size=[48, 64], frame_skip=2)
    return make_cfg(
        wd,
        datasets=[tiny_synthetic(scenes=2, seed=0, **room)],
        fit2d={
            "datasets": [tiny_synthetic(name="corpus", scenes=3, seed=corpus_seed, **room)],
            "iterations": 6,
            "batch_size": 2,
            "head_dim": 16,
            "checkpoint_every": 3,
            "device": "cpu",
            **fit,
        },
        teacher={"name": "fitted", "device": "cpu", "batch_size": 4, "shard_frames": 4},
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A clean fit in one workdir, and one killed after 3 steps then resumed in another."""
    clean = fit_cfg(tmp_path_factory.mktemp("clean"))
    run_stage(clean, "frames")
    rows = run_stage(clean, "fit2d")
    killed = fit_cfg(tmp_path_factory.mktemp("killed"))
    run_stage(killed, "frames")
    stopped = fit2d.train(killed, stop_at=3)
    return clean, rows, killed, stopped


def test_kill_and_resume_give_the_clean_network(fitted):
    clean, rows, killed, stopped = fitted
    assert stopped[0]["status"] == "stopped" and stage_status(killed, "fit2d")[0] == "out of date"
    resumed = run_stage(killed, "fit2d")
    assert resumed[0]["status"] == "trained" and rows[0]["status"] == "trained"
    a = torch.load(fit2d.run_dir(clean) / "model.pt", weights_only=True)
    b = torch.load(fit2d.run_dir(killed) / "model.pt", weights_only=True)
    assert a["kind"] == FIT2D_MODEL_KIND and a["classes"] == scannet20_names() and a["input_size"] == [48, 64]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert (fit2d.run_dir(clean) / "loss.png").is_file() and rows[0]["heldout_frames"] == 4  # scene0002: 4 frames
    assert stage_status(clean, "fit2d")[0] == "done"
    assert run_stage(clean, "fit2d")[0]["status"] == "up to date"


def test_fitted_teacher_caches_its_whole_distribution(fitted):
    cfg = fitted[0]
    run_stage(cfg, "teacher")
    g = zarr.open_group(str(store_path(cfg["workdir"], "teacher") / "fitted" / "tiny"), mode="r")
    assert g.attrs["top_k"] == 20 and g.attrs["full_distribution"] and g.attrs["classes"] == scannet20_names()
    prob, index = g["soft_labels/prob"][...].astype(np.float32), g["soft_labels/index"][...]
    assert prob.shape[1:] == (20, 3, 4)  # 48 x 64 frames at stride 16
    assert (np.sort(index, axis=1) == np.arange(20)[None, :, None, None]).all()  # every class once per cell
    # the network of model.pt run directly: (x / 255 - mean) / std inside Seg2D, softmax over 20
    obj = torch.load(fit2d.run_dir(cfg) / "model.pt", weights_only=True)
    net = Seg2D(efficientnet_lite0(pretrained=False), 20, 16)
    net.load_state_dict(obj["model"])
    rgb = zarr.open_group(str(store_path(cfg["workdir"], "frames") / "tiny"), mode="r")["rgb"][...]
    with torch.no_grad():
        want = torch.softmax(net.eval()(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())["logits"], 1).numpy()
    got = np.zeros_like(want)
    np.put_along_axis(got, index.astype(np.int64), prob, axis=1)
    np.testing.assert_allclose(got, want, atol=2e-3)  # float16 storage
    feats = g["features"]
    assert feats.shape[1:] == (16, 3, 4) and g.attrs["stride"] == 16
    res = eval_teacher(cfg, "tiny")
    assert res["evaluated"] and res["frames"] == 8 and 0.0 <= res["miou"] <= 1.0


def test_corpus_sharing_a_room_is_refused(tmp_path):
    cfg = fit_cfg(tmp_path, corpus_seed=0)  # the corpus draws the 3D dataset's rooms
    with pytest.raises(Fit2dError, match=r"shares 2 scene\(s\).*corpus/scene0000_00 is tiny/scene0000_00"):
        run_stage(cfg, "fit2d")


def test_teacher_needs_a_complete_fit2d_run(tmp_path):
    from lift3d.pipeline.teacher import teacher_section

    with pytest.raises(TeacherError, match="run 'lift3d run fit2d' first"):
        teacher_section(fit_cfg(tmp_path))
    assert stage_status(make_cfg(tmp_path), "fit2d")[0] == "not used"  # the defaults: an ImageNet teacher
    state, why = stage_status(make_cfg(tmp_path, teacher={"name": "fitted"}), "fit2d")
    assert state == "missing" and "fit2d.datasets (the 2D corpus) is empty" in why[0]


def save(path, **obj):
    torch.save(obj, path)
    return path


def test_weights_that_do_not_fit_are_refused(tmp_path):
    net = Seg2D(efficientnet_lite0(pretrained=False), 20, 16)
    good = {
        "kind": FIT2D_MODEL_KIND,
        "model": net.state_dict(),
        "backbone": "efficientnet_lite0",
        "num_classes": 20,
        "classes": scannet20_names(),
        "head_dim": 16,
        "input_size": [48, 64],
    }
    t = build_teacher("fitted", weights=str(save(tmp_path / "good.pt", **good)))
    assert t.classes == scannet20_names() and t.input_size == (48, 64) and t.channels == 16
    cases = {
        "other.pt": ({**good, "kind": "lift3d.distill2d"}, "is not a fit2d model.pt"),
        "classes.pt": ({**good, "num_classes": 21, "classes": scannet20_names() + ["x"]}, "expected the 20 ScanNet-20"),
        "width.pt": ({**good, "head_dim": 32}, "does not fit the efficientnet_lite0 PSPNet"),
    }
    for name, (obj, msg) in cases.items():
        with pytest.raises(TeacherError, match=rf"{name}.*{msg}|{msg}.*{name}"):
            build_teacher("fitted", weights=str(save(tmp_path / name, **obj)))
    with pytest.raises(TeacherError, match="missing.pt not found"):
        build_teacher("fitted", weights=str(tmp_path / "missing.pt"))
