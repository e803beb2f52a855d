"""The sparse backend through the trainers: a network pretrained with spconv fine-tunes with
MinkowskiEngine (and back), checkpoints record their backend, identities keep their old value for
the default backend, and export / eval / distill2d read spconv checkpoints. Each check compares
the network a trainer built with the other library's network on the same voxels."""

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

ME = pytest.importorskip("MinkowskiEngine")
pytest.importorskip("spconv")

from lift3d.cli import main  # noqa: E402
from lift3d.nets.sparse import build_model, sparse_input, weights_for  # noqa: E402
from lift3d.train import finetune as FT  # noqa: E402
from lift3d.train import pretrain as P  # noqa: E402
from lift3d.train.distill2d import cache as DC  # noqa: E402
from tests.fixtures.config import distill_cfg, finetune_cfg  # noqa: E402
from tests.fixtures.models import write_model_file  # noqa: E402
from tests.fixtures.stores import run_stages  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOL = 1e-4  # relative to the largest magnitude, as in test_backend_equality


def voxels(seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(-10, 10, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1).int()
    return coords, torch.randn(len(coords), 3, generator=g)


def decoder(net, coords, feats, backend):
    with torch.no_grad():
        return net.eval()(sparse_input(feats, coords, backend), return_decoder=True)[1].F


def assert_close(got, want, what):
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= TOL * scale, f"{what}: {err:.3g} vs {TOL} x {scale:.3g}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return run_stages(finetune_cfg(tmp_path_factory.mktemp("bk")), "frames", "teacher", "points")


def cfg_in(wd, **sections):
    cfg = copy.deepcopy(finetune_cfg(wd))
    for section, keys in sections.items():
        cfg[section].update(keys)
    return cfg


def test_identity_keeps_the_default_and_separates_spconv(stores):
    base = cfg_in(stores)
    assert "sparse_backend" not in P.identity(base)["pretrain"]
    sp = cfg_in(stores, pretrain={"sparse_backend": "spconv"})
    assert P.identity(sp)["pretrain"]["sparse_backend"] == "spconv" and P.run_dir(sp) != P.run_dir(base)
    # fine-tuning: the backend it trains on enters only when it is not the default
    assert "sparse_backend" not in FT.identity(base)["finetune"]
    assert FT.identity(sp)["finetune"]["sparse_backend"] == "spconv"
    cross = cfg_in(stores, pretrain={"sparse_backend": "spconv"}, finetune={"sparse_backend": "minkowski"})
    assert "sparse_backend" not in FT.identity(cross)["finetune"] and FT.run_dir(cross) != FT.run_dir(sp)
    with pytest.raises(ValueError, match="pretrain.sparse_backend: unknown sparse backend 'cuda'"):
        P.identity(cfg_in(stores, pretrain={"sparse_backend": "cuda"}))


def test_pretrain_spconv_then_finetune_minkowski(stores, tmp_path):
    cfg = cfg_in(stores, pretrain={"sparse_backend": "spconv"}, finetune={"sparse_backend": "minkowski"})
    run_stages(cfg, "pretrain")
    d = P.run_dir(cfg)
    model = torch.load(d / "model.pt", weights_only=True)
    assert model["backend"] == "spconv"
    assert torch.load(d / "checkpoint.pt", weights_only=False)["backend"] == "spconv"
    assert any(v.dim() == 5 for v in model["model"].values())  # spconv's (out, K, K, K, in) kernels
    # the fine-tuning network (MinkowskiEngine) built from it computes the pretrained features
    net, meta = FT.build_network(cfg)
    assert meta["backend"] == "minkowski" and net.backend == "minkowski"
    sp = build_model(model["model_name"], 3, model["out_channels"], backend="spconv")
    sp.load_state_dict(model["model"])
    coords, feats = voxels()
    assert_close(decoder(net, coords, feats, "minkowski"), decoder(sp, coords, feats, "spconv"), "decoder")
    # the fine-tuning run trains and records its backend; its model evaluates on either backend
    (summary,) = FT.run(cfg)
    ft = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)
    assert summary["status"] == "trained" and ft["backend"] == "minkowski"
    me_net, _ = FT.load_segmentation_model(FT.run_dir(cfg))
    sp_net, _ = FT.load_segmentation_model(FT.run_dir(cfg), "spconv")
    assert sp_net.backend == "spconv"
    with torch.no_grad():
        want = me_net.eval()(sparse_input(feats, coords)).F
        got = sp_net.eval()(sparse_input(feats, coords, "spconv")).F
    assert_close(got, want, "segmentation logits")
    # export from the spconv pretraining run's checkpoint.pt: MinkowskiEngine's layout
    res = CliRunner().invoke(main, ["export", str(d / "checkpoint.pt"), "--out", str(tmp_path / "pc.pth")])
    assert res.exit_code == 0, res.output
    exported = torch.load(tmp_path / "pc.pth", weights_only=True)
    assert exported["conv0p1s1.kernel"].shape == (27, 3, 32)
    me = build_model(model["model_name"], 3, model["out_channels"])
    me.load_state_dict(exported)
    assert_close(decoder(me, coords, feats, "minkowski"), decoder(sp, coords, feats, "spconv"), "exported")


def test_finetune_from_scratch_on_spconv(stores):
    cfg = cfg_in(stores, pretrain={"sparse_backend": "spconv"}, finetune={"init": "scratch", "iterations": 2})
    (summary,) = FT.run(cfg)
    ft = torch.load(FT.run_dir(cfg) / "model.pt", weights_only=True)
    assert summary["status"] == "trained" and ft["backend"] == "spconv" and np.isfinite(float(summary["val_miou"]))


def test_distill2d_runs_a_spconv_checkpoint_on_spconv(tmp_path):
    path = tmp_path / "model.pt"
    sd = write_model_file(path, "Res16UNet14A", 20, backend="spconv", voxel_size=0.1)
    net, info = DC.load_3d(path, distill_cfg(tmp_path, str(path)))
    assert net.backend == "spconv" and info["channels"] == 96
    me = build_model("Res16UNet14A", 3, 20).eval()
    me.load_state_dict(weights_for(me, sd, "spconv"))
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-1, 1, (500, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    got = DC.vertex_features(net, xyz, rgb, 0.1, torch.device("cpu"))
    want = DC.vertex_features(me, xyz, rgb, 0.1, torch.device("cpu"))
    assert got.shape == (500, 96)
    assert_close(torch.from_numpy(got), torch.from_numpy(want), "vertex features")
