"""Fault injection: SIGKILL the frames, points and teacher stages and pretraining at random
moments, re-run, compare.

Each trial starts `lift3d run STAGE` as its own process, kills it once a random number of its
parts (scene parts; teacher shards; pretraining checkpoints) are done, plus a random delay
(seeded: the seed is in every assertion message), re-runs it to the end, and asserts the store
(or the trained weights) equals the one from an uninterrupted run, with every expected frame
present exactly once. One more trial kills `frames` and re-runs it with a changed configuration:
the stale parts must never reach the store.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tests.fixtures.config import write_config
from tests.fixtures.faults import error_line, run_lift3d
from tests.fixtures.stores import assert_same_store, snapshot

TINY = {
    "datasets": [
        {
            "name": "syn",
            "kind": "synthetic",
            "root": None,
            "frame_skip": 2,
            "split": "all",
            "scenes": 3,
            "seed": 1,
            "frames_per_scene": 24,
            "depth_size": [48, 64],
        }
    ],
    "cluster": {"n_workers": 0},
    # 33 frames in shards of 4: 9 teacher parts
    "teacher": {"device": "cpu", "input_size": [32, 64], "batch_size": 2, "shard_frames": 4},
    # 8 M parameters (a 64 MB checkpoint); a checkpoint every 2 of the 6 steps
    "pretrain": {
        "model": "Res16UNet14A",
        "feature_dim": 16,
        "proj_dim": 16,
        "voxel_size": 0.2,
        "batch_size": 2,
        "n_sub": 128,
        "iterations": 6,
        "device": "cpu",
        "checkpoint_every": 2,
        "run_name": "tiny",
    },
}
PARTS = {"frames": "frames", "points": "points", "teacher": "teacher/efficientnet_lite0"}


def done_parts(wd, stage):
    if stage == "pretrain":  # the step of the last checkpoint: pretraining's unit of done work
        info = (
            json.loads((wd / "runs/pretrain/tiny/run.json").read_text())
            if (wd / "runs/pretrain/tiny/run.json").exists()
            else {}
        )
        return int(info.get("step", 0))
    return sum('"done": true' in p.read_text() for p in wd.glob(f".parts/{PARTS[stage]}/syn/*/*/zarr.json"))


def lift3d(cfg_path, stage, check=True, kill_at=None, args=()):
    """Run a stage; with ``kill_at=(k, delay)``, SIGKILL it ``delay`` s after its k-th part is
    done (k past the last part lands in the commit). Returns the exit code."""
    cmd = [sys.executable, "-m", "lift3d.cli", "run", stage, "-c", str(cfg_path), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    if kill_at is not None:
        k, delay = kill_at
        wd = Path(yaml.safe_load(Path(cfg_path).read_text())["workdir"])
        while p.poll() is None and done_parts(wd, stage) < k:
            time.sleep(0.005)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        return p.returncode
    out, _ = p.communicate(timeout=300)
    assert not check or p.returncode == 0, out.decode()[-2000:]
    return p.returncode


def config(tmp_path, name):
    """tmp_path/<name>.yaml: TINY with workdir tmp_path/<name>; returns both paths."""
    return write_config(tmp_path, name, TINY)


@pytest.fixture(scope="module")
def clean_wd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    p, wd = config(tmp, "clean")
    lift3d(p, "frames")
    lift3d(p, "points")
    return wd


@pytest.fixture(scope="module")
def clean(clean_wd):
    return snapshot(clean_wd / "frames.zarr" / "syn"), snapshot(clean_wd / "points.zarr" / "syn")


def same_store(got, want, seed):
    assert_same_store(got, want, f"seed {seed}")


SEEDS = (11, 12, 13, 14)


def test_killed_frames_and_points_resume_to_the_clean_store(clean, tmp_path):
    interrupted = {"frames": 0, "points": 0}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        p, wd = config(tmp_path, f"kill{seed}")
        # kill after the k-th of the 3 scene parts is done (k = 3: during the commit), plus a jitter
        for stage in ("frames", "points"):
            rc = lift3d(p, stage, kill_at=(int(rng.integers(1, 4)), float(rng.uniform(0, 0.02))))
            interrupted[stage] += rc == -signal.SIGKILL
            lift3d(p, stage)
        for got, want in zip((snapshot(wd / "frames.zarr" / "syn"), snapshot(wd / "points.zarr" / "syn")), clean):
            same_store(got, want, seed)
        arrays, _ = snapshot(wd / "frames.zarr" / "syn")
        pairs = list(zip(arrays["scene_index"].tolist(), arrays["source_index"].tolist()))
        assert len(pairs) == len(set(pairs))  # every frame exactly once
    # the trials really killed running stages (not only finished ones)
    print("interrupted", interrupted)
    assert interrupted["frames"] >= 2 and interrupted["points"] >= 2, interrupted


def in_process(cfg_path, stage):
    """The same stage runner `lift3d run` calls, in this process: the teacher and the 3D network
    are built once per test session (a process per re-run would cost ~6 s of imports each)."""
    from lift3d.core import config as C
    from lift3d.core import graph as S

    return S.run_stage(C.load(str(cfg_path), []), stage)


def upstream_copy(clean_wd, tmp_path, name, stores=("frames",)):
    """A trial's workdir holding copies of the clean run's upstream stores (same configuration)."""
    p, wd = config(tmp_path, name)
    for store in stores:
        shutil.copytree(clean_wd / f"{store}.zarr", wd / f"{store}.zarr")
    return p, wd


@pytest.fixture(scope="module")
def clean_teacher(clean_wd):
    in_process(clean_wd.parent / "clean.yaml", "teacher")
    return snapshot(clean_wd / "teacher.zarr" / "efficientnet_lite0" / "syn")


TEACHER_SEEDS = (21, 22, 23)


def test_killed_teacher_resumes_to_the_clean_store(clean_wd, clean_teacher, tmp_path):
    n_frames = zarr.open_group(str(clean_wd / "frames.zarr" / "syn"), mode="r")["rgb"].shape[0]
    n_shards = -(-n_frames // TINY["teacher"]["shard_frames"])
    assert clean_teacher[0]["features"].shape[0] == n_frames and n_shards >= 6
    killed = 0
    for seed in TEACHER_SEEDS:
        rng = np.random.default_rng(seed)
        p, wd = upstream_copy(clean_wd, tmp_path, f"teacher{seed}")
        # after the k-th of the shards is done (k = n_shards + 1: during the commit), plus a jitter
        rc = lift3d(p, "teacher", kill_at=(int(rng.integers(1, n_shards + 2)), float(rng.uniform(0, 0.05))))
        killed += rc == -signal.SIGKILL
        group = wd / "teacher.zarr" / "efficientnet_lite0" / "syn"
        in_process(p, "teacher")
        got = snapshot(group)
        same_store(got, clean_teacher, seed)
        assert got[0]["features"].shape[0] == n_frames  # every frame once, in frame order (== clean)
    assert killed >= 2, killed


@pytest.fixture(scope="module")
def pretrain_wd(clean_wd, clean_teacher, tmp_path_factory):
    """The clean run's three caches plus one uninterrupted pretraining run's weights and metrics."""
    tmp = tmp_path_factory.mktemp("pre")
    p, wd = upstream_copy(clean_wd, tmp, "pre", ("frames", "teacher", "points"))
    in_process(p, "pretrain")
    return wd, weights(wd)


def weights(wd):
    import torch

    d = wd / "runs" / "pretrain" / "tiny"
    model = torch.load(d / "model.pt", weights_only=False)["model"]
    metrics = [r.split(",")[:2] for r in (d / "metrics.csv").read_text().splitlines()]
    return model, metrics, json.loads((d / "run.json").read_text())


PRETRAIN_SEEDS = (31, 32, 33)


def test_killed_pretraining_resumes_to_the_same_weights(pretrain_wd, tmp_path):
    import torch

    src, (want, want_metrics, want_info) = pretrain_wd
    steps = TINY["pretrain"]["iterations"]
    assert want_info["complete"] and len(want_metrics) == steps + 1
    killed = 0
    for seed in PRETRAIN_SEEDS:
        rng = np.random.default_rng(seed)
        p, wd = config(tmp_path, f"pre{seed}")
        for store in ("frames", "teacher", "points"):
            shutil.copytree(src / f"{store}.zarr", wd / f"{store}.zarr")
        # after the checkpoint of step >= k (k = steps: while model.pt, loss.png, run.json are written)
        rc = lift3d(p, "pretrain", kill_at=(int(rng.integers(1, steps + 1)), float(rng.uniform(0, 0.3))))
        killed += rc == -signal.SIGKILL
        in_process(p, "pretrain")
        got, metrics, info = weights(wd)
        assert info["complete"] and info["step"] == steps, f"seed {seed}"
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"seed {seed}: {k}"
        assert metrics == want_metrics, f"seed {seed}"  # every step once, same losses
    assert killed >= 2, killed


def test_killed_then_changed_configuration_never_mixes_stale_parts(tmp_path):
    """A killed frames run (frame_skip 2) leaves done parts; a run with frame_skip 3 must give
    exactly the store of a clean frame_skip 3 run: none of the stale frames."""
    ref_p, ref_wd = config(tmp_path, "ref3")
    lift3d(ref_p, "frames", args=["-o", "datasets.0.frame_skip=3"])
    want = snapshot(ref_wd / "frames.zarr" / "syn")
    p, wd = config(tmp_path, "changed")
    shutil.copytree(ref_wd / "raw", wd / "raw")  # the same generated dataset (not re-generated)
    rc = lift3d(p, "frames", kill_at=(1, 0.0))
    assert rc == -signal.SIGKILL
    stale = list(wd.glob(".parts/frames/syn/*"))
    assert len(stale) == 1 and done_parts(wd, "frames") >= 1  # stale done parts exist
    lift3d(p, "frames", args=["-o", "datasets.0.frame_skip=3"])
    got = snapshot(wd / "frames.zarr" / "syn")
    same_store(got, want, "changed config")
    assert got[0]["source_index"].size and (got[0]["source_index"] % 3 == 0).all()
    assert not any(s.exists() for s in stale)  # the stale parts were dropped, not kept around


def test_pretraining_disk_full_is_one_clear_line_and_resumes(pretrain_wd, tmp_path):
    import torch

    src, (want, want_metrics, _) = pretrain_wd
    p, wd = config(tmp_path, "full")
    for store in ("frames", "teacher", "points"):
        shutil.copytree(src / f"{store}.zarr", wd / f"{store}.zarr")
    ckpt = wd / "runs" / "pretrain" / "tiny" / "checkpoint.pt"
    # a file size limit under the checkpoint's size: the first checkpoint cannot be written
    res = run_lift3d(["run", "pretrain", "-c", p], fsize=(src / "runs/pretrain/tiny/checkpoint.pt").stat().st_size // 2)
    assert res.returncode == 1, res.out[-2000:]
    line = error_line(res.out)
    assert "pretrain failed" in line and f"{ckpt}: cannot write" in line, line
    assert "File too large" in line and "disk is full" in line and "re-run resumes" in line, line
    assert not ckpt.exists() and not ckpt.with_name("checkpoint.pt.tmp").exists()  # nothing half-written
    in_process(p, "pretrain")  # space freed: the same command again
    got, metrics, info = weights(wd)
    assert info["complete"] and metrics == want_metrics
    for k in want:
        assert torch.equal(got[k], want[k]), k
