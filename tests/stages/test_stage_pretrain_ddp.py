"""Data-parallel pretraining: 2 processes with the gloo backend on a tiny store.

The two processes are started with torch.multiprocessing.spawn and torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so ``lift3d.train.pretrain.run`` joins the
group exactly as under ``torchrun -m lift3d.cli run pretrain``. Expectations are computed here,
in one process, without torch.distributed:

- the first step's DDP gradient on each rank equals the mean of the gradients of the two shards
  (frames 0-1 and 2-3 of global batch 0) computed one after the other with a fresh learner;
- after two optimiser steps both ranks hold identical parameters;
- the trainer's logged step-0 loss is the mean of the two shards' losses; metrics.csv has one row
  per step (rank 0 alone writes it) and run.json records world_size 2;
- a DDP run stopped after 2 steps and resumed ends with the same weights as an uninterrupted one.
"""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lift3d.train import data as D
from lift3d.train import pretrain as P
from tests.fixtures.config import pretrain_cfg
from tests.fixtures.stores import run_stages

NOAUG = {"rotate_up": False, "scale": False, "elastic": False, "color_methods": [], "flip_2d": False}
WORLD = 2


def ddp_cfg(wd, **pretrain) -> dict:
    """The pretraining tests' tiny config with 4-frame global batches (2 per rank)."""
    return pretrain_cfg(
        wd,
        **{
            "batch_size": 4,
            "n_sub": 64,
            "iterations": 4,
            "method": "ppnce",
            "optimizer": "sgd",
            "lr": 0.05,
            **pretrain,
        },
    )


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    return run_stages(ddp_cfg(tmp_path_factory.mktemp("ddp")), "frames", "teacher", "points")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, wd: str, port: int, out: str) -> None:
    """One rank: a hand-driven DDP step pair, then three trainer runs through P.run / P.train."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    import torch.distributed as tdist

    cfg = ddp_cfg(wd, augment=NOAUG)
    assert P.init_distributed(cfg) and tdist.get_backend() == "gloo"
    p, cpu = cfg["pretrain"], torch.device("cpu")
    src = D.open_sources(cfg)
    learner, opt = P.build(cfg, src)
    ddp = P.wrap_ddp(learner, p, cpu, False)
    batches = list(D.loader(cfg, src, start=0, stop=2, rank=rank, world=WORLD))
    res = {"ids": [b["ids"] for b in batches]}
    for s, b in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = ddp(b, s)
        loss.backward()
        if s == 0:
            res["loss0"] = float(loss.detach())
            res["grads"] = {n: q.grad.detach().clone() for n, q in learner.named_parameters()}
        opt.step()
    res["params"] = {n: q.detach().clone() for n, q in learner.named_parameters()}
    res["buffers"] = {n: q.detach().clone() for n, q in learner.named_buffers()}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    del ddp
    # the trainer: plain run, uninterrupted (augmented) run, stopped + resumed (augmented) run
    P.run(ddp_cfg(wd, augment=NOAUG, run_name="ddp-noaug", iterations=2))
    P.run(ddp_cfg(wd, run_name="ddp-straight"))
    P.train(ddp_cfg(wd, run_name="ddp-killed"), stop_at=2)
    P.run(ddp_cfg(wd, run_name="ddp-killed"))
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_out(wd, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_out")
    mp.spawn(_worker, args=(str(wd), _free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def shard_batches(cfg, src, b: int):
    """Global batch b cut in two halves, each collated as a single-process batch (no augmentation)."""
    ds = D.PretrainStream(cfg, src, augment=False)
    frames = ds.global_frames(b)
    n = len(frames) // WORLD
    out = []
    for r in range(WORLD):
        fs = [ds.read_frame(int(g)) for g in frames[r * n : (r + 1) * n]]
        for f in fs:
            f["coords"] = D.to_frame(f["coords"], f["pose"], cfg["pretrain"]["frame"])
        out.append(D.collate(fs, float(cfg["pretrain"]["voxel_size"]), cfg["pretrain"]["method"]))
    return out


def single_process_grads(cfg, src, batch):
    learner, _ = P.build(cfg, src)  # same seed: the same initial weights as every rank
    loss = P.compute_loss(learner, batch, cfg["pretrain"], torch.device("cpu"), step=0)
    loss.backward()
    return float(loss), {n: q.grad.detach().clone() for n, q in learner.named_parameters()}


def test_shards_partition_every_global_batch(wd):
    cfg = ddp_cfg(wd)
    src = D.open_sources(cfg)
    one = D.PretrainStream(cfg, src)
    ranks = [D.PretrainStream(cfg, src, rank=r, world=WORLD) for r in range(WORLD)]
    for b in range(5):
        whole = one.batch_frames(b).tolist()
        assert [g for ds in ranks for g in ds.batch_frames(b).tolist()] == whole
        assert all(len(ds.batch_frames(b)) == 2 for ds in ranks)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        D.PretrainStream(cfg, src, rank=0, world=3)


def test_first_step_gradient_is_the_mean_of_the_shards(wd, ddp_out):
    _, res = ddp_out
    cfg = ddp_cfg(wd, augment=NOAUG)
    src = D.open_sources(cfg)
    shards = shard_batches(cfg, src, 0)
    for r in range(WORLD):
        assert [tuple(x) for x in res[r]["ids"][0]] == shards[r]["ids"]  # rank r read the r-th half of batch 0
    (l0, g0), (l1, g1) = (single_process_grads(cfg, src, b) for b in shards)
    assert res[0]["loss0"] == pytest.approx(l0, rel=1e-5) and res[1]["loss0"] == pytest.approx(l1, rel=1e-5)
    differ = 0
    for n in g0:
        want = (g0[n] + g1[n]) / 2
        for r in range(WORLD):
            torch.testing.assert_close(res[r]["grads"][n], want, rtol=1e-5, atol=1e-7, msg=n)
        differ += not torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-6)
    assert differ > len(g0) // 2  # the shards really disagree: a rank's own gradient would fail


def test_ranks_hold_identical_weights_and_batch_norm_is_per_rank(ddp_out):
    _, res = ddp_out
    assert res[0]["params"].keys() == res[1]["params"].keys()
    for n in res[0]["params"]:
        assert torch.equal(res[0]["params"][n], res[1]["params"][n]), n
    # documented: batch norm is not synchronised; each rank's running statistics saw its own frames
    means = [n for n in res[0]["buffers"] if n.endswith("running_mean")]
    assert means and any(not torch.equal(res[0]["buffers"][n], res[1]["buffers"][n]) for n in means)


def test_trainer_logs_the_mean_loss_once_and_resumes(wd, ddp_out):
    cfg = ddp_cfg(wd, augment=NOAUG)
    src = D.open_sources(cfg)
    runs = wd / "runs" / "pretrain"
    rows = (runs / "ddp-noaug" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 3  # header + 2 steps, one writer
    l0, _ = single_process_grads(cfg, src, shard_batches(cfg, src, 0)[0])
    l1, _ = single_process_grads(cfg, src, shard_batches(cfg, src, 0)[1])
    assert float(rows[1].split(",")[1]) == pytest.approx((l0 + l1) / 2, abs=2e-6)
    for name in ("ddp-noaug", "ddp-straight", "ddp-killed"):
        info = json.loads((runs / name / "run.json").read_text())
        assert info["complete"] and info["world_size"] == WORLD
    a = torch.load(runs / "ddp-straight" / "model.pt", weights_only=False)["model"]
    b = torch.load(runs / "ddp-killed" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m1 = (runs / "ddp-straight" / "metrics.csv").read_text().splitlines()
    m2 = (runs / "ddp-killed" / "metrics.csv").read_text().splitlines()
    assert len(m1) == 5 and [r.split(",")[:2] for r in m1] == [r.split(",")[:2] for r in m2]
    assert np.isfinite([float(r.split(",")[1]) for r in m1[1:]]).all()
    assert P.status(ddp_cfg(wd, run_name="ddp-straight"))[0] == "done"
