"""Fine-tuning, evaluation, the data-efficient files and the verdict.

The chain synth -> frames -> teacher -> points -> pretrain -> finetune -> eval runs on a tiny
synthetic dataset (3 rooms: 2 train, 1 val). Scores are recomputed here from the stored
confusion matrices and from the meshes with plain numpy; label files are written with
torch.save as the benchmark ships them.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.core import metrics as M
from lift3d.pipeline.readers.base import ReaderError
from lift3d.pipeline.readers.scannet_labels import read_labelled_mesh
from lift3d.train import finetune as FT
from lift3d.train import pretrain as P
from lift3d.train import scenes as SC
from lift3d.train.verdict import run_verdict
from tests.fixtures.config import finetune_cfg, write_yaml
from tests.fixtures.models import write_model_file
from tests.fixtures.stores import run_stages


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return run_stages(finetune_cfg(tmp_path_factory.mktemp("ft")), "frames", "teacher", "points", "pretrain")


def raw(wd):
    return wd / "raw" / "tiny"


# -- metrics ----------------------------------------------------------------------------------
def test_scores_by_hand():
    gt = np.array([0, 0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 0, 1, 1, 0, 2, 1, 3])
    conf = M.confusion_matrix(gt, pred, 4, 255)
    assert conf.sum() == 6 and conf[0, 0] == 2 and conf[0, 1] == 1 and conf[1, 0] == 1 and conf[2, 2] == 1
    s = M.segmentation_scores(conf, ["a", "b", "c", "d"])
    # class a: TP 2, FP 1 (a b predicted a), FN 1 -> 2/4; b: TP 1, FP 1, FN 1 -> 1/3; c: 1/1; d absent
    assert s["iou"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 1.0})
    assert s["miou"] == pytest.approx((0.5 + 1 / 3 + 1.0) / 3)
    assert s["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert s["overall_acc"] == pytest.approx(4 / 6)
    names = [line.split()[0] for line in M.format_table(s).splitlines()[1:4]]
    assert names == ["a", "b", "c"]  # one row per class present; "d" has no row


def test_entropy_rampup_ema_by_hand():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    mask = torch.tensor([True, False, True])
    p = 1 / (1 + np.exp(-1.0))
    h2 = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert float(FT.entropy_loss(logits, mask)) == pytest.approx((np.log(2) + h2) / 2, rel=1e-5)
    assert float(FT.entropy_loss(logits, torch.zeros(3, dtype=torch.bool))) == 0.0
    assert FT.rampup(0, 100) == pytest.approx(np.exp(-5)) and FT.rampup(50, 100) == pytest.approx(np.exp(-1.25))
    assert FT.rampup(100, 100) == 1.0 and FT.rampup(500, 100) == 1.0
    t, s = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    w0 = t.weight.detach().clone()
    FT.ema_update(t, s, 0.9)
    torch.testing.assert_close(t.weight, 0.9 * w0 + 0.1 * s.weight.detach())


def test_scene_order_is_epochs_of_permutations():
    names = [f"s{i}" for i in range(5)]
    seq = [n for step in range(5) for n in FT.scene_order(names, 3, step, 2)]
    assert sorted(seq[:5]) == names and sorted(seq[5:10]) == names
    assert FT.scene_order(names, 3, 4, 2) == FT.scene_order(names, 3, 4, 2)
    assert seq != [n for step in range(5) for n in FT.scene_order(names, 4, step, 2)]


def test_voxelise_maps_each_vertex_to_its_cell():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-1, 1, (500, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    b = FT.voxelise([(xyz, rgb), (xyz[:100] + 5, rgb[:100])], 0.25)
    cells = np.floor(xyz / 0.25).astype(np.int64)
    assert len(np.unique(cells, axis=0)) + len(np.unique(np.floor((xyz[:100] + 5) / 0.25), axis=0)) == len(b["coords"])
    got = b["coords"][b["vertex_voxel"][0]].numpy()
    assert (got[:, 0] == 0).all()
    np.testing.assert_array_equal(got[:, 1:], cells)
    assert (b["coords"][b["vertex_voxel"][1]].numpy()[:, 0] == 1).all()


# -- label files ------------------------------------------------------------------------------
def test_la_lr_files_round_trip_and_errors(wd, tmp_path):
    ds = SC.LabelledDataset(finetune_cfg(wd)["datasets"][0], wd)
    train = ds.split("train")
    assert train == ["scene0000_00", "scene0001_00"] and ds.split("val") == ["scene0002_00"]
    p = SC.make_la_file(ds, train, 7, 0, tmp_path / "points7.pth")
    data = torch.load(p, weights_only=False)
    assert sorted(data) == train
    for s, idx in data.items():
        _, _, nyu = read_labelled_mesh(raw(wd) / "scans" / s)
        assert idx.dtype == torch.int64 and len(idx) == 7 and len(set(idx.tolist())) == 7
        assert np.isin(nyu[idx.numpy()], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]).all()
    counts = {s: len(ds.scene(s).labels) for s in train}
    got = SC.read_la_file(p, counts)
    np.testing.assert_array_equal(got[train[0]], data[train[0]].numpy())
    torch.save({"scene0999_00": torch.arange(3)}, tmp_path / "unknown.pth")
    with pytest.raises(ReaderError, match=r"unknown\.pth.*scene0999_00"):
        SC.read_la_file(tmp_path / "unknown.pth", counts)
    n = counts[train[0]]
    torch.save({train[0]: torch.tensor([0, n])}, tmp_path / "range.pth")
    with pytest.raises(ReaderError, match=rf"range\.pth.*index {n} out of range.*{n} vertices"):
        SC.read_la_file(tmp_path / "range.pth", counts)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ReaderError, match=r"list\.pth.*expected a dict"):
        SC.read_la_file(tmp_path / "list.pth", counts)
    (tmp_path / "lr.txt").write_text("scene0000_00\nscene0002_00\n")
    with pytest.raises(ReaderError, match=r"lr\.txt.*scene0002_00"):
        SC.read_lr_file(tmp_path / "lr.txt", train)
    lr = SC.make_lr_file(train, 50, 0, tmp_path / "half.txt")
    assert len(SC.read_lr_file(lr, train)) == 1


# -- fine-tuning --------------------------------------------------------------------------------
def test_pretrained_weights_loaded_final_fresh(wd):
    cfg = finetune_cfg(wd)
    pre = torch.load(P.run_dir(cfg) / "model.pt", weights_only=False)
    net, meta = FT.build_network(cfg)
    assert meta["model_name"] == "Res16UNet14" and meta["pretrain_method"] == "ppnce"
    sd = net.state_dict()
    for k, v in pre["model"].items():
        if k.startswith("final."):
            assert sd[k].shape[-1] == 20 and v.shape[-1] == 16
        else:
            torch.testing.assert_close(sd[k], v)
    scratch, _ = FT.build_network(finetune_cfg(wd, init="scratch"))
    assert not torch.equal(scratch.state_dict()["conv0p1s1.kernel"], pre["model"]["conv0p1s1.kernel"])


def test_finetune_la_eval_and_resume(wd):
    cfg = finetune_cfg(wd, la_points=5)
    rows = S.run_stage(cfg, "finetune")
    d = FT.run_dir(cfg)
    assert rows[0]["status"] == "trained" and d.name.startswith("from-ppnce-")
    info = json.loads((d / "run.json").read_text())
    assert info["complete"] and info["supervised_vertices"] == 2 * 5
    ev = json.loads((d / "eval.json").read_text())
    # recompute the scores from the model's predictions over the val mesh's vertices, by hand
    net, state = FT.load_segmentation_model(d)
    net.eval()
    xyz, rgb, nyu = read_labelled_mesh(raw(wd) / "scans" / "scene0002_00")
    lut = np.full(41, -1)
    lut[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]] = np.arange(20)
    gt = lut[nyu]
    b = FT.voxelise([(xyz - xyz.mean(0), rgb)], state["voxel_size"])
    with torch.no_grad():
        pred = FT.forward(net, b, torch.device("cpu")).argmax(1)[b["vertex_voxel"][0]].numpy()
    ious = []
    for c in np.unique(gt[gt >= 0]):
        tp = np.sum((gt == c) & (pred == c))
        ious.append(tp / (np.sum(gt == c) + np.sum((pred == c) & (gt >= 0)) - tp))
    assert ev["miou"] == pytest.approx(np.mean(ious))
    assert info["eval"]["miou"] == ev["miou"] and (d / "eval.txt").read_text().count("\n") >= 4
    assert S.stage_status(cfg, "finetune")[0] == "done"
    assert S.run_stage(cfg, "finetune")[0]["status"] == "up to date"
    # a killed run (stop after 2 steps, checkpoint at 2) resumes to the same weights
    cfg2 = finetune_cfg(wd, la_points=5, run_name="resumed")
    assert FT.train(cfg2, stop_at=2)["status"] == "stopped"
    assert S.stage_status(cfg2, "finetune")[0] == "out of date"
    FT.train(cfg2)
    a = torch.load(d / "model.pt", weights_only=False)["model"]
    r = torch.load(FT.run_dir(cfg2) / "model.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(r[k], a[k], rtol=0, atol=0)


def test_head_warmup_then_lower_backbone_rate(wd):
    """probe_steps: the first steps move the fresh head alone (batch-norm statistics kept);
    backbone_lr_mult 0 keeps every pretrained layer where pretraining left it."""
    pre = torch.load(P.run_dir(finetune_cfg(wd)) / "model.pt", weights_only=True)["model"]
    cfg = finetune_cfg(wd, la_points=5, iterations=2, probe_steps=2, run_name="probe")
    FT.train(cfg)
    after = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)["model"]
    moved = {k for k in after if not k.startswith("final.") and not torch.equal(after[k], pre[k])}
    assert not moved, sorted(moved)[:5]  # weights and running statistics alike
    scratch_head = FT.build_network(cfg)[0].state_dict()["final.kernel"]
    assert not torch.equal(after["final.kernel"], scratch_head)  # the head learned
    cfg = finetune_cfg(wd, la_points=5, iterations=3, probe_steps=1, backbone_lr_mult=0.0, run_name="frozen")
    FT.train(cfg)
    after = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)["model"]
    for k, v in pre.items():
        if not k.startswith("final.") and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    cfg = finetune_cfg(wd, la_points=5, iterations=2, probe_steps=1, run_name="unfrozen")
    FT.train(cfg)
    after = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)["model"]
    assert not torch.equal(after["conv0p1s1.kernel"], pre["conv0p1s1.kernel"])  # step 2 moves everything
    # from scratch there is nothing pretrained to keep: both settings leave the network alone
    cfg = finetune_cfg(
        wd, init="scratch", la_points=5, iterations=1, probe_steps=5, backbone_lr_mult=0.0, run_name="scratch-free"
    )
    start = FT.build_network(cfg)[0].state_dict()["conv0p1s1.kernel"].clone()
    FT.train(cfg)
    after = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)["model"]
    assert not torch.equal(after["conv0p1s1.kernel"], start)


def test_semi_supervised_terms_run(wd):
    cfg = finetune_cfg(
        wd,
        init="scratch",
        la_points=5,
        iterations=2,
        semi={
            "entropy_weight": 0.5,
            "mean_teacher": True,
            "ema_decay": 0.9,
            "consistency_weight": 1.0,
            "rampup_steps": 2,
        },
    )
    FT.train(cfg)
    rows = (FT.run_dir(cfg) / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    vals = dict(zip(head, rows[1].split(",")))
    assert float(vals["entropy"]) > 0 and float(vals["consistency"]) >= 0
    # the total is ce + 0.5 entropy + rampup(0, 2) consistency
    expect = float(vals["ce"]) + 0.5 * float(vals["entropy"]) + np.exp(-5) * float(vals["consistency"])
    assert float(vals["loss"]) == pytest.approx(expect, rel=1e-4)


def test_refuses_pretraining_that_saw_val_scenes(wd, tmp_path):
    cfg = finetune_cfg(tmp_path, split="all")
    cfg["datasets"][0]["root"] = str(raw(wd))  # the already generated data
    run_stages(cfg, "frames", "teacher", "points", "pretrain")
    with pytest.raises(FT.FinetuneError, match=r"validation scene.*scene0002_00.*split: train"):
        FT.train(cfg)


def test_bad_checkpoints(wd, tmp_path):
    cfg = finetune_cfg(wd)
    pre = P.run_dir(cfg)
    with pytest.raises(FT.FinetuneError, match=r"Res16UNet14, but finetune.model is 'Res16UNet18'"):
        FT.build_network(finetune_cfg(wd, model="Res16UNet18"))
    wrong = torch.load(pre / "model.pt", weights_only=False)
    wrong["model_name"] = "Res16UNet34C"  # claims another architecture than its weights
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(FT.FinetuneError, match=r"wrong\.pt: the weights do not fit Res16UNet34C"):
        FT.build_network(finetune_cfg(wd, init=str(tmp_path / "wrong.pt")))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(FT.FinetuneError, match=r"plain\.pt: expected a lift3d model.pt"):
        FT.build_network(finetune_cfg(wd, init=str(tmp_path / "plain.pt")))
    with pytest.raises(FT.FinetuneError, match="without a segmentation head"):
        FT.eval_checkpoint(cfg, pre)
    write_model_file(tmp_path / "c13.pt", "Res16UNet14", 13, num_classes=13, voxel_size=0.2)
    with pytest.raises(FT.FinetuneError, match=r"c13\.pt: the checkpoint predicts 13 classes.*20"):
        FT.eval_checkpoint(cfg, tmp_path / "c13.pt")
    with pytest.raises(FT.FinetuneError, match="both set"):
        FT.train(finetune_cfg(wd, la_points=5, la_file=str(tmp_path / "x.pth")))


def test_cli_eval_checkpoint_and_verdict(wd, tmp_path):
    """A tiny verdict end to end (2 seeds, a handful of steps, worker processes): the JSON's
    structure, each run's figure against its own eval.json, and the markdown; not the numbers."""
    cfg = finetune_cfg(wd)
    cfg_path = write_yaml(
        tmp_path / "cfg.yaml",
        {k: cfg[k] for k in ("workdir", "datasets", "cluster", "teacher", "pretrain", "finetune")},
    )
    res = run_verdict(C.load(cfg_path), [0, 1], la_points=5, methods=("ppnce",), jobs=2)
    saved = json.loads((wd / "verdict.json").read_text())
    assert saved == json.loads(json.dumps(res)) and saved["schema"] == 2 and saved["seeds"] == [0, 1]
    assert list(saved["methods"]) == ["scratch", "ppnce", "ceiling"]
    for arm, r in saved["methods"].items():
        assert set(r["per_seed"]) == {"0", "1"}
        for s, v in r["per_seed"].items():
            ev = json.loads((__import__("pathlib").Path(v["run_dir"]) / "eval.json").read_text())
            assert v["miou"] == pytest.approx(100 * ev["miou"]) and 0 <= v["macc"] <= 100
            assert (v["probe_miou"] is None) == (arm != "ppnce")
        if arm != "scratch":
            d = r["paired_diff"]
            assert (
                set(d) >= {"mean", "ci95_low", "ci95_high", "per_seed"} and d["ci95_low"] <= d["mean"] <= d["ci95_high"]
            )
            want = [r["per_seed"][s]["miou"] - saved["methods"]["scratch"]["per_seed"][s]["miou"] for s in ("0", "1")]
            assert d["per_seed"] == pytest.approx(want)
    assert set(saved["methods"]["ppnce"]["pretrain"]) == {"final_loss", "final_floor", "steps", "run_dir"}
    assert saved["methods"]["ppnce"]["pretrain"]["final_floor"] == pytest.approx(np.log(64), abs=1e-3)  # ln(n_sub)
    assert (
        set(saved["baselines"]["colour_nn"]) == {"0", "1"} and saved["baselines"]["colour_nn"]["0"]["supervised"] == 10
    )
    assert set(saved["controls"]) == {"shuffled_pairs", "random"}
    assert set(saved["controls"]["random"]["probe_miou"]) == {"0", "1"}
    assert "ppnce_minus_control" in saved["controls"]["shuffled_pairs"]
    assert saved["ceiling"]["all_labels_miou"] is not None and set(saved["goal"]) >= {"ceiling_within_5"}
    text = (wd / "verdict.md").read_text()
    assert "| PPKT (ppnce) |" in text and "colour nearest neighbour" in text and "supervised ceiling" in text
    run_dir = saved["methods"]["ppnce"]["per_seed"]["0"]["run_dir"]
    out = CliRunner().invoke(main, ["eval", run_dir, "-c", str(cfg_path), "--out", str(tmp_path / "e.json")])
    assert out.exit_code == 0, out.output
    assert 100 * json.loads((tmp_path / "e.json").read_text())["miou"] == pytest.approx(
        saved["methods"]["ppnce"]["per_seed"]["0"]["miou"]
    )
    bad = CliRunner().invoke(main, ["eval", str(tmp_path / "nothing.pt"), "-c", str(cfg_path)])
    assert bad.exit_code != 0 and "nothing.pt: no such checkpoint" in bad.output


def test_missing_labelled_mesh_is_named(tmp_path):
    root = tmp_path / "scannet"
    (root / "scans" / "scene0000_00").mkdir(parents=True)
    (root / "scannetv2_train.txt").write_text("scene0000_00\n")
    ds = SC.LabelledDataset({"name": "s", "kind": "scannet", "root": str(root), "split": "train"}, tmp_path)
    with pytest.raises(ReaderError, match=r"scannetv2_train\.txt.*scene0000_00_vh_clean_2\.labels\.ply"):
        ds.split("train")
    with pytest.raises(ReaderError, match=r"scannetv2_val\.txt not found"):
        ds.split("val")
    with pytest.raises(ReaderError, match="kind 'sunrgbd' has no labelled meshes"):
        SC.LabelledDataset({"name": "x", "kind": "sunrgbd", "root": str(root)}, tmp_path)
