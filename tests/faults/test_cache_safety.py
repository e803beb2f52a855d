"""Never lose an expensive cache by accident: a complete store made by another configuration is
refused unless --rebuild, an invalid setting leaves every byte as it was, a rebuild keeps the old
store readable until the new one is complete (a kill in the middle included), and throughput
settings stay out of the identities."""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import zarr

from lift3d.core import graph as G
from lift3d.core.errors import StoreError
from lift3d.train import distill2d, pretrain
from tests.fixtures.config import make_cfg, tiny_synthetic
from tests.fixtures.stores import run_stages


def tree_hash(path: Path) -> str:
    """sha256 over every file under ``path`` (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def small(wd, **teacher):
    return make_cfg(
        wd,
        datasets=[tiny_synthetic(scenes=1, seed=0, frames_per_scene=8, depth_size=[24, 32])],
        teacher={"input_size": [32, 48], "batch_size": 2, "device": "cpu", "shard_frames": 2, **teacher},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    wd = tmp_path_factory.mktemp("built")
    run_stages(small(wd), "frames", "teacher", "points")
    return wd


def test_identities_hold_only_what_changes_the_result():
    """Moving a setting in or out of an identity is a visible decision: this list says which."""
    assert G.THROUGHPUT == {"frames": (), "teacher": ("batch_size", "shard_frames", "device"), "points": ()}
    assert pretrain.BOOKKEEPING == ("num_workers", "checkpoint_every", "run_name", "log_every", "backend", "device")
    from lift3d.train import finetune

    assert finetune.BOOKKEEPING == ("device", "checkpoint_every", "run_name", "eval_every")
    assert importlib.import_module("lift3d.train.distill2d.train").BOOKKEEPING == (
        "checkpoint_every",
        "run_name",
        "device",
    )


def test_throughput_settings_leave_the_stores_up_to_date(built, tmp_path):
    before = tree_hash(built / "teacher.zarr")
    for override in (
        {"batch_size": 5},
        {"shard_frames": 3},
        {"device": "auto"} if not torch.cuda.is_available() else {"batch_size": 3},
    ):
        cfg = small(built, **override)
        assert G.stage_status(cfg, "teacher")[0] == "done", override
        assert G.stage_status(cfg, "points")[0] == "done", override
        (row,) = G.run_stage(cfg, "teacher")
        assert row["status"] == "up to date", override
    assert tree_hash(built / "teacher.zarr") == before
    # a device that computes the same (auto on a CPU-only machine) is the same pretraining run
    if not torch.cuda.is_available():
        a = make_cfg(tmp_path, pretrain={"device": "auto"})
        b = make_cfg(tmp_path, pretrain={"device": "cpu"})
        assert pretrain.run_dir(a) == pretrain.run_dir(b)


def test_another_configuration_is_refused_and_an_invalid_one_changes_nothing(built):
    before = {s: tree_hash(built / f"{s}.zarr") for s in ("frames", "teacher", "points")}
    # a setting that changes the result: refused, naming the key, the size and the age
    with pytest.raises(
        StoreError,
        match=r"teacher.zarr/efficientnet_lite0/tiny \(.* GB, made .* h ago\) was made by "
        r"another configuration \(.*top_k: 5 -> 3.*--rebuild",
    ):
        G.run_stage(small(built, top_k=3), "teacher")
    with pytest.raises(StoreError, match=r"points.zarr/tiny .*voxel_size: 0.025 -> 0.05.*--rebuild"):
        G.run_stage(
            make_cfg(
                built, "points.voxel_size=0.05", datasets=small(built)["datasets"], teacher=small(built)["teacher"]
            ),
            "points",
        )
    # an invalid value, with --rebuild: the error comes before any byte changes
    bad = small(built, pca_channels=512)
    bad["rebuild"] = True
    with pytest.raises(ValueError, match="pca_channels must be between 1 and 319"):
        G.run_stage(bad, "teacher")
    assert {s: tree_hash(built / f"{s}.zarr") for s in before} == before
    assert G.stage_status(small(built), "teacher")[0] == "done"


def test_rebuild_replaces_and_a_kill_during_it_keeps_the_old_store(tmp_path):
    wd = tmp_path / "wd"
    cfg = make_cfg(
        wd,
        datasets=[tiny_synthetic(scenes=1, seed=0, frames_per_scene=24, depth_size=[24, 32])],
        teacher={"input_size": [96, 128], "batch_size": 1, "device": "cpu", "shard_frames": 2},
    )
    run_stages(cfg, "frames", "teacher")
    old = tree_hash(wd / "teacher.zarr")
    path = tmp_path / "c.yaml"
    raw = {
        "workdir": str(wd),
        "cluster": {"n_workers": 0},
        "datasets": cfg["datasets"],
        "teacher": {
            **{k: cfg["teacher"][k] for k in ("input_size", "batch_size", "device")},
            "top_k": 3,
            "shard_frames": 1,
        },
    }
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "lift3d.cli", "run", "teacher", "-c", str(path), "--rebuild"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    parts = wd / ".parts" / "teacher"
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in parts.rglob("zarr.json") if '"done": true' in p.read_text()]
        if len(done) >= 2:  # in the middle of the rebuild
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the rebuild finished before the kill"
    assert tree_hash(wd / "teacher.zarr") == old  # the old store, untouched and readable
    g = zarr.open_group(str(wd / "teacher.zarr" / "efficientnet_lite0" / "tiny"), mode="r")
    assert g.attrs["complete"] and g.attrs["config"]["stage"]["top_k"] == 5
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    g = zarr.open_group(str(wd / "teacher.zarr" / "efficientnet_lite0" / "tiny"), mode="r")
    assert g.attrs["complete"] and g.attrs["config"]["stage"]["top_k"] == 3
    assert not list((wd / "teacher.zarr" / "efficientnet_lite0").glob("tiny.*"))  # no .new / .old left


def test_distill2d_run_folders_follow_the_3d_checkpoint(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    ca = make_cfg(tmp_path, distill2d={"checkpoint": str(a)})
    cb = make_cfg(tmp_path, distill2d={"checkpoint": str(b)})
    assert distill2d.run_dir(ca) != distill2d.run_dir(cb)
    # null = the fine-tuned network of this configuration: another fine-tuning, another folder
    c1 = make_cfg(tmp_path, "finetune.iterations=2")
    c2 = make_cfg(tmp_path, "finetune.iterations=3")
    assert distill2d.run_dir(c1) != distill2d.run_dir(c2)


def test_messages_say_what_is_wrong(tmp_path):
    from click.testing import CliRunner

    from lift3d.cli import main
    from lift3d.core.config import ConfigError
    from lift3d.core.config import load as load_config
    from lift3d.core.errors import FinetuneError, ReaderError
    from lift3d.train import finetune
    from lift3d.train.scenes import read_lr_file

    # YAML 1.1's yes/no are not booleans here: a boolean key refuses them, naming the key
    with pytest.raises(ConfigError, match=r"finetune.semi.mean_teacher: got 'yes' \(string\), expected boolean"):
        load_config(None, ["finetune.semi.mean_teacher=yes"])
    assert load_config(None, ["finetune.semi.mean_teacher=true"])["finetune"]["semi"]["mean_teacher"] is True
    (tmp_path / "c.yaml").write_text("skip_failed_scenes: on\n")
    with pytest.raises(ConfigError, match="skip_failed_scenes: got 'on'"):
        load_config(tmp_path / "c.yaml")
    # a missing LR file is named as such (not as a split file)
    with pytest.raises(ReaderError, match=r"finetune.lr_file .*nope.txt: no such file"):
        read_lr_file(tmp_path / "nope.txt", ["scene0000_00"])
    # a relative init path: looked up under the workdir, then here; the error names both, and no
    # warning about a missing run.json comes first
    cfg = make_cfg(tmp_path / "wd", "finetune.init=runs/pretrain/none")
    with pytest.raises(
        FinetuneError,
        match=r"finetune.init: runs/pretrain/none: no such checkpoint .*neither "
        r".*wd/runs/pretrain/none \(under the workdir\) nor",
    ):
        finetune.check_val_unseen(cfg, None, [])
    run = tmp_path / "wd" / "runs" / "pretrain" / "there"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"x")
    cfg = make_cfg(tmp_path / "wd", "finetune.init=runs/pretrain/there")
    assert finetune.init_path(cfg) == run / "model.pt"
    # a negative frame number is an argument, refused as such
    res = CliRunner().invoke(main, ["show", "synthetic", "-1", "-o", f"workdir={tmp_path}"])
    assert res.exit_code != 0 and "frames are numbered from 0" in res.output and "No such option" not in res.output
