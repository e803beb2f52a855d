"""3D-to-2D distillation: projection, DN1 / DN2 statistics, the covered-pixel L2 loss, the PSP
shapes, the alternating adversarial updates, bad checkpoints, and a tiny end-to-end run with a
kill and resume. Expectations are hand-computed or independent of the code under test.
"""

import json

import numpy as np
import pytest
import torch
import zarr

from lift3d.core.store import StoreError
from lift3d.nets import backbones2d as backbones
from lift3d.nets import pspnet as N
from lift3d.train import distill2d as D
from tests.fixtures.config import distill_cfg, make_cfg
from tests.fixtures.models import write_model_file
from tests.fixtures.stores import run_stages

# ----------------------------------------------------------------------------- projection


def test_projection_hand_computed():
    # camera at t looking along world +y: camera x = world +x, camera y (down) = world -z
    t = np.array([1.0, 2.0, 0.5])
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = [1, 0, 0], [0, 0, -1], [0, 1, 0], t
    K = (10.0, 10.0, 4.0, 3.0)  # fx, fy, cx, cy; H = 8, W = 10

    def world(cam):  # X = t + R X_cam
        x, y, z = cam
        return [t[0] + x, t[1] + z, t[2] - y]

    cams = {
        "A": (0.0, 0.0, 2.0),  # pixel (3, 4)
        "B": (0.4, 0.2, 2.0),  # (4, 6)
        "C": (0.6, 0.3, 3.0),  # (4, 6) too, but 1 m behind the measured surface: occluded
        "D": (-0.4, 0.0, 2.5),  # (3, 2): alone, but the measured depth there is 1.5 m
        "E": (-0.594, -0.396, 1.98),  # (1, 1), z 1.98
        "F": (-0.609, -0.406, 2.03),  # (1, 1), z 2.03: both within 5 cm of 2.0, E is nearer
        "G": (0.0, 0.0, -2.0),  # behind the camera
        "H": (2.0, 0.0, 2.0),  # column 14: outside
        "I": (0.8, 0.6, 2.0),  # (6, 8): no depth measured there
    }
    names = list(cams)
    xyz = np.array([world(cams[n]) for n in names], np.float32)
    depth = np.full((8, 10), 2.0)
    depth[3, 2] = 1.5
    depth[6, 8] = 0.0
    idx, pix = D.project_points(xyz, pose.astype(np.float32), K, depth, 0.05)
    assert [names[i] for i in idx] == ["E", "A", "B"]
    assert pix.tolist() == [[1, 1], [3, 4], [4, 6]]
    # a wider tolerance lets the points near the measured surface in, the nearest still wins
    idx, pix = D.project_points(xyz, pose.astype(np.float32), K, depth, 1.1)
    assert [names[i] for i in idx] == ["E", "D", "A", "B"]


# ----------------------------------------------------------------------------- DN1 / DN2


def test_dn1_output_has_the_global_3d_statistics():
    torch.manual_seed(0)
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])
    std = torch.tensor([1.0, 0.2, 3.0, 0.5, 0.01])
    dn1 = N.DN1(8, 5, mean, std).train()
    x = torch.randn(4, 8, 6, 7) * 3 + 1
    y = dn1(x).detach()
    flat = y.transpose(0, 1).reshape(5, -1).double()
    np.testing.assert_allclose(flat.mean(1).numpy(), mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(flat.std(1, unbiased=False).numpy(), std.numpy(), rtol=1e-3)
    with torch.no_grad():  # learnable offsets shift and scale on top
        dn1.d_mean.fill_(0.25)
        dn1.d_std.fill_(0.5)
    flat = dn1(x).detach().transpose(0, 1).reshape(5, -1).double()
    np.testing.assert_allclose(flat.mean(1).numpy(), (mean + 0.25).numpy(), atol=1e-5)
    np.testing.assert_allclose(flat.std(1, unbiased=False).numpy(), (std + 0.5).numpy(), rtol=1e-3)


def test_dn2_output_has_the_2d_statistics():
    torch.manual_seed(1)
    dn2 = N.DN2(5, 3).train()
    f2d = (
        torch.randn(4, 3, 6, 7) * torch.tensor([2.0, 0.5, 1.0])[None, :, None, None]
        + torch.tensor([1.0, -3.0, 0.0])[None, :, None, None]
    )
    sim = torch.randn(4, 5, 6, 7) * 7 + 4
    y = dn2(sim, f2d).detach()
    want = f2d.transpose(0, 1).reshape(3, -1).double()
    got = y.transpose(0, 1).reshape(3, -1).double()
    np.testing.assert_allclose(got.mean(1).numpy(), want.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got.std(1, unbiased=False).numpy(), want.std(1, unbiased=False).numpy(), rtol=1e-3)


# ----------------------------------------------------------------------------- the L2 loss


def test_l2_only_on_covered_pixels_hand_computed():
    # a 2-channel 2x2 map for a 4x4 frame: pixel (0, 0) lies at cell position (-0.25, -0.25),
    # clamped to cell (0, 0); pixel (1, 2) at rows 0.25, cols 0.75
    m = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 10.0], [20.0, 30.0]]])[None].requires_grad_()
    frame = torch.tensor([0, 0])
    pix = torch.tensor([[0, 0], [1, 2]])
    target = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    # (1, 2): channel 0 = 0.75*(0.25*1 + 0.75*2) + 0.25*(0.25*3 + 0.75*4) = 2.25;
    #         channel 1 = 0.75*(0.25*0 + 0.75*10) + 0.25*(0.25*20 + 0.75*30) = 12.5
    want = ((1 - 0) ** 2 + (0 - 1) ** 2 + (2.25 - 2) ** 2 + (12.5 - 3) ** 2) / 2
    loss = N.masked_l2(m, frame, pix, target, (4, 4))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # cell (0, 0) gets gradient from both pixels; a map cell no covered pixel touches gets none
    m2 = torch.zeros(1, 2, 4, 4, requires_grad=True)
    N.masked_l2(m2, frame, pix, target, (4, 4)).backward()
    touched = torch.zeros(4, 4, dtype=torch.bool)
    touched[0, 0] = touched[1, 2] = True
    assert (m2.grad[0].abs().sum(0)[~touched] == 0).all() and (m2.grad[0].abs().sum(0)[touched] > 0).all()
    assert N.masked_l2(m2, frame[:0], pix[:0], target[:0], (4, 4)).item() == 0.0


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def lite0():
    return backbones.efficientnet_lite0


def test_psp_and_output_stride(lite0):
    ppm = N.PyramidPooling(16)
    assert ppm(torch.randn(2, 16, 5, 7)).shape == (2, 32, 5, 7)
    net = N.Seg2D(lite0(), 20, 16, 12, torch.zeros(12), torch.ones(12)).train()
    out = net(torch.rand(2, 3, 48, 64) * 255)
    assert out["logits"].shape == (2, 20, 3, 4) and out["f3d_sim"].shape == (2, 12, 3, 4)  # stride 16
    base = N.Seg2D(lite0(), 20, 16).eval()
    out = base(torch.rand(1, 3, 120, 160) * 255)
    assert set(out) == {"logits"} and out["logits"].shape == (1, 20, 8, 10)
    # a torchvision ResNet-50 trunk goes from stride 32 to 16 the same way
    import torchvision

    r = torchvision.models.resnet50(weights=None)
    trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4).eval()
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 64, 96)).shape[2:] == (2, 3)
        N.dilate_last_stage(trunk)
        assert trunk(torch.zeros(1, 3, 64, 96)).shape[2:] == (4, 6)
    assert r.layer4[0].conv2.stride == (1, 1) and r.layer4[1].conv2.dilation == (2, 2)


# ----------------------------------------------------------------------------- adversarial updates


def test_alternating_updates_touch_only_their_parameters(lite0):
    torch.manual_seed(0)
    d = {
        "loss_seg": 1.0,
        "loss_l2": 0.03,
        "loss_adv": 0.01,
        "disc_samples": 8,
        "lr": 0.01,
        "head_lr_mult": 10.0,
        "momentum": 0.9,
        "weight_decay": 0.0,
    }
    net = N.Seg2D(lite0(), 20, 16, 12, torch.zeros(12), torch.ones(12)).train()
    disc = N.Discriminators(12, 20, 8)
    opt = D.make_optimizer(d, net)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    labels = torch.full((2, 48, 64), 255, dtype=torch.long)
    labels[1, :20] = 3
    labels[1, 20:] = 7
    batch = {
        "rgb": torch.rand(2, 3, 48, 64) * 255,
        "labels": labels,
        "unpaired": [False, True],
        "pair_frame": torch.tensor([0, 0]),
        "pair_pixel": torch.tensor([[1, 1], [10, 20]]),
        "pair_feat": torch.randn(2, 12),
    }
    real = {3: torch.randn(5, 12), 9: torch.randn(4, 12)}  # category 7 has no real features here
    g0 = {k: v.clone() for k, v in net.state_dict().items()}
    d0 = {k: v.clone() for k, v in disc.state_dict().items()}
    parts, fake = D.generator_step(net, disc, opt, batch, d, (48, 64), np.random.default_rng(0), real)
    assert set(fake) == {3, 7} and "adv" in parts and parts["adv"] > 0
    assert all(torch.equal(v, d0[k]) for k, v in disc.state_dict().items())
    assert all(p.grad is None for p in disc.parameters())
    assert not torch.equal(net.classifier[1].weight, g0["classifier.1.weight"])
    assert not torch.equal(net.dn1.d_mean, g0["dn1.d_mean"])
    g1 = {k: v.clone() for k, v in net.state_dict().items()}
    D.discriminator_step(disc, opt_d, fake, real)
    assert all(torch.equal(v, g1[k]) for k, v in net.state_dict().items())
    changed = {int(k.split(".")[1]) for k, v in disc.state_dict().items() if not torch.equal(v, d0[k])}
    assert changed == {3}  # only the category with both real and fake samples


# ----------------------------------------------------------------------------- checkpoints


def write_3d(path, name="Res16UNet14A", out=16, **over):
    write_model_file(path, name, out, **over)
    return path


def test_bad_checkpoints_are_refused(tmp_path):
    cfg = make_cfg(tmp_path / "w")
    good = write_3d(tmp_path / "good.pt")
    net, info = D.load_3d(good, cfg)
    assert info["channels"] == net.decoder_dim == 96 and info["voxel_size"] == cfg["pretrain"]["voxel_size"]
    torch.save(
        {"model": {"fc.weight": torch.zeros(3, 3)}, "model_name": "ResNet50", "in_channels": 3, "out_channels": 3},
        tmp_path / "resnet.pt",
    )
    with pytest.raises(D.DistillError, match="resnet.pt.*not a Res16UNet"):
        D.load_3d(tmp_path / "resnet.pt", cfg)
    obj = torch.load(good, weights_only=False)
    torch.save({**obj, "out_channels": 32}, tmp_path / "chan.pt")
    with pytest.raises(D.DistillError, match="chan.pt.*do not fit Res16UNet14A\\(3, 32\\)"):
        D.load_3d(tmp_path / "chan.pt", cfg)
    torch.save({**obj, "in_channels": 4}, tmp_path / "in4.pt")
    with pytest.raises(D.DistillError, match="in4.pt.*in_channels"):
        D.load_3d(tmp_path / "in4.pt", cfg)
    torch.save(obj["model"], tmp_path / "bare.pt")
    with pytest.raises(D.DistillError, match="bare.pt.*not a lift3d 3D model file"):
        D.load_3d(tmp_path / "bare.pt", cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(D.DistillError, match="junk.pt.*cannot read"):
        D.load_3d(tmp_path / "junk.pt", cfg)
    cfg["distill2d"]["checkpoint"] = str(tmp_path / "empty_run")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run/model.pt"):
        D.resolve_checkpoint(cfg)
    cfg["workdir"] = str(tmp_path / "w")
    cfg["distill2d"]["checkpoint"] = None  # = the finetune run, which does not exist here
    with pytest.raises(StoreError, match="finetune"):
        D.resolve_checkpoint(cfg)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2d")
    ck = write_3d(root / "model3d.pt")
    run_stages(distill_cfg(root, ck), "frames")
    return root, ck


def test_cache_labels_agree_with_the_2d_labels(tiny):
    """The projected 3D points carry their mesh label; at their pixels the rendered 2D label image
    must mostly say the same (a wrong pose direction, axis or row/col order would not)."""
    wd, ck = tiny
    cfg = distill_cfg(wd, ck)
    sources = D.open_sources(cfg)
    assert sources[0].eval_scenes == ["scene0002_00"]
    caches = D.build_cache(cfg, sources, ck)
    path, _ = caches["tiny"]
    g = zarr.open_group(path, mode="r")
    fr = zarr.open_group(str(wd / "frames.zarr/tiny"), mode="r")
    assert g.attrs["complete"] and sorted(g.attrs["scenes"]) == ["scene0000_00", "scene0001_00"]
    assert g["feats"].dtype == np.float16 and g["feats"].shape[1] == 96
    off, fi = g["offsets"][...], g["frame_index"][...]
    assert sorted(fi.tolist()) == list(range(fr["rgb"].shape[0]))
    labels = D.default_labels(cfg["datasets"][0], wd)
    agree = total = 0
    for i, row in enumerate(fi):
        pix = g["pixel"][off[i] : off[i + 1]]
        lab3 = g["label3d"][off[i] : off[i + 1]].astype(int)
        assert len(pix) > 20 and len(np.unique(pix[:, 0] * 64 + pix[:, 1])) == len(pix)  # one point per pixel
        depth = fr["depth"][int(row)][pix[:, 0], pix[:, 1]]
        assert (depth > 0).all()
        scene = fr.attrs["scenes"][int(fr["scene_index"][row])]
        gt = D.to_grid(labels(scene, int(fr["source_index"][row])), 48, 64)[pix[:, 0], pix[:, 1]]
        ok = (gt >= 0) & (lab3 < 20)
        agree += int((gt[ok] == lab3[ok]).sum())
        total += int(ok.sum())
    covered = int(off[-1]) / (len(fi) * 48 * 64)
    # measured: 79 % of the pixels covered, 95.5 % agreement; with the pose's rotation transposed
    # (a world-to-camera / camera-to-world mix-up) 17.5 % and 88 %
    assert covered > 0.5 and agree / total > 0.92, (covered, agree, total)
    # training batches: flipped frames flip their 3D pixels too, so labels still agree; the L2
    # loss sees at most l2_pixels points of a frame; unpaired frames show none
    cfg = distill_cfg(wd, ck, l2_pixels=50, batch_size=4)
    data = D.TrainData(cfg, sources, caches)
    flips = agree = total = 0
    for b in range(6):
        batch = data.batch(b, True)
        flips += sum(batch["flips"])
        fidx, pix, l3 = batch["pair_frame"], batch["pair_pixel"], batch["pair_label"]
        counts = np.bincount(fidx.numpy(), minlength=4)
        assert all((c == 0) == u for c, u in zip(counts, batch["unpaired"])) and counts.max() <= 50
        gt = batch["labels"][fidx, pix[:, 0], pix[:, 1]]
        ok = (gt < 20) & (l3 < 20)
        agree += int((gt[ok] == l3[ok]).sum())
        total += int(ok.sum())
    assert 0 < flips < 24 and agree / total > 0.9, (flips, agree, total)
    # a second call finds the cache complete and leaves it alone
    mtime = (wd / path.split(str(wd) + "/")[1] / "zarr.json").stat().st_mtime_ns
    D.build_cache(cfg, sources, ck)
    assert (wd / path.split(str(wd) + "/")[1] / "zarr.json").stat().st_mtime_ns == mtime


def test_end_to_end_kill_resume_and_status(tiny):
    wd, ck = tiny
    straight = distill_cfg(wd, ck, run_name="straight")
    assert D.status(straight)[0] == "missing"
    rows = D.run(straight)
    assert [r["network"] for r in rows] == ["baseline", "distilled"]
    assert all(r["status"] == "trained" and r["steps"] == 4 and r["miou_2d"] is not None for r in rows)
    d = D.run_dir(straight)
    ev = json.loads((d / "eval.json").read_text())
    assert ev["unpaired_frames"] == round(0.5 * ev["train_frames"]) > 0
    for k in ("baseline", "distilled"):
        assert 0.0 <= ev[k]["miou"] <= 1.0 and ev[k]["frames"] == 4 and ev[k]["ms_per_frame"] > 0
    assert ev["distilled"]["parameters"] > ev["baseline"]["parameters"]
    assert ev["extra_inference_ms_per_frame"] == pytest.approx(
        ev["distilled"]["ms_per_frame"] - ev["baseline"]["ms_per_frame"]
    )
    metrics = (d / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 9
    dist = [r.split(",") for r in metrics[1:] if r.startswith("distilled")]
    assert any(float(r[4]) > 0 for r in dist)  # l2 logged
    assert any(r[5] for r in dist) and any(r[6] for r in dist)  # adversarial + disc
    assert D.status(straight)[0] == "done"
    assert D.summary(straight)["2D mIoU distilled"] == ev["distilled"]["miou"]
    assert D.run(straight)[0]["status"] == "up to date"

    killed = distill_cfg(wd, ck, run_name="killed")
    assert D.train(killed, stop_at=3)[0]["status"] == "stopped"
    assert D.status(killed)[0] == "out of date"
    D.run(killed)
    for name in ("baseline.pt", "model.pt"):
        a = torch.load(d / name, weights_only=False)["model"]
        b = torch.load(D.run_dir(killed) / name, weights_only=False)["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # a changed setting is a new run folder
    assert D.run_dir(distill_cfg(wd, ck, lr=0.02)) != D.run_dir(distill_cfg(wd, ck))
