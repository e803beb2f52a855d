"""Two processes on one stage, a full disk, no permission to write: each is one clear line for
the user, never a corrupt store, and a re-run (once the cause is gone) gives the clean store.

Every stage runs here as its own `lift3d` process (tests/fixtures/faults.py): the disk fills up through
RLIMIT_FSIZE (writes fail with EFBIG), permissions are made to apply even when the tests run as
root, and the second of two concurrent processes meets the first one stopped (SIGSTOP) while it
holds the stage, so the outcome never depends on timing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import zarr

from lift3d.core import config as C
from tests.fixtures.config import make_cfg, write_config
from tests.fixtures.faults import error_line, run_lift3d
from tests.fixtures.stores import assert_same_store, run_stages, snapshot

TINY = {
    "datasets": [
        {
            "name": "syn",
            "kind": "synthetic",
            "root": None,
            "frame_skip": 2,
            "split": "all",
            "scenes": 3,
            "seed": 2,
            "frames_per_scene": 12,
            "depth_size": [24, 32],
        }
    ],
    "cluster": {"n_workers": 0},
}


def config(tmp, name):
    """tmp/<name>.yaml: TINY with workdir tmp/<name>; returns both paths."""
    return write_config(tmp, name, TINY)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted in-process run of frames and points; its raw data is reused below."""
    tmp = tmp_path_factory.mktemp("clean")
    p, wd = config(tmp, "clean")
    run_stages(C.load(str(p), []), "frames", "points")
    return wd, snapshot(wd / "frames.zarr" / "syn"), snapshot(wd / "points.zarr" / "syn")


def trial(clean, tmp_path, name):
    """A fresh workdir with the clean run's generated raw data (so no stage re-generates it)."""
    p, wd = config(tmp_path, name)
    shutil.copytree(clean[0] / "raw", wd / "raw")
    return p, wd


def incomplete(wd, store):
    path = wd / f"{store}.zarr" / "syn"
    return not (path / "zarr.json").exists() or not zarr.open_group(str(path), mode="r").attrs.get("complete")


# -- two processes ----------------------------------------------------------------------------
def test_second_process_on_the_same_stage_is_refused(clean, tmp_path):
    p, wd = trial(clean, tmp_path, "two")
    cmd = [sys.executable, "-m", "lift3d.cli", "run", "frames", "-c", str(p)]
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    lock = wd / ".locks" / "frames.lock"
    try:
        # the first process holds the stage once its pid is in the lock file; stop it right there
        while first.poll() is None and not (lock.exists() and lock.read_text().strip() == f"pid {first.pid}"):
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first process ended before it could be stopped"
        second = run_lift3d(["run", "frames", "-c", p])
        assert second.returncode == 1, second.out
        line = error_line(second.out)
        assert "already running" in line and f"pid {first.pid}" in line and str(wd) in line, line
        assert incomplete(wd, "frames")  # the second one wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert_same_store(snapshot(wd / "frames.zarr" / "syn"), clean[1])
    again = run_lift3d(["run", "frames", "-c", p])  # the stage is free again: a no-op
    assert again.returncode == 0 and "up to date" in again.out, again.out[-2000:]


def test_two_pretraining_runs_on_one_run_folder_are_refused(tmp_path):
    from lift3d.core.store import StoreError, stage_lock
    from lift3d.train import pretrain as P

    cfg = make_cfg(tmp_path, pretrain={"run_name": "r"})
    with stage_lock(tmp_path, "pretrain-r"):  # as another process holding that run would
        with pytest.raises(StoreError, match=r"'pretrain-r' is already running"):
            P.run(cfg)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# -- a full disk --------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["frames", "points"])
def test_disk_full_is_one_clear_line_and_the_rerun_completes(clean, tmp_path, stage):
    p, wd = trial(clean, tmp_path, f"full-{stage}")
    if stage == "points":
        run_lift3d(["run", "frames", "-c", p])
    final = clean[0] / f"{stage}.zarr" / "syn"
    meta = max(f.stat().st_size for f in final.rglob("zarr.json"))
    # a limit every metadata file fits under but the data chunks do not: the stage fails writing data
    big = max(f.stat().st_size for f in final.rglob("*") if f.is_file() and f.name != "zarr.json")
    assert meta < big, (meta, big)
    res = run_lift3d(["run", stage, "-c", p], fsize=meta + 1)
    assert res.returncode == 1, res.out[-2000:]
    line = error_line(res.out)
    assert f"{stage} failed" in line and str(wd / ".parts" / stage / "syn") in line, line
    assert "File too large" in line and "disk is full" in line and "re-run" in line, line
    assert incomplete(wd, stage)
    res = run_lift3d(["run", stage, "-c", p])  # space freed: the same command again
    assert res.returncode == 0, res.out[-2000:]
    assert_same_store(snapshot(wd / f"{stage}.zarr" / "syn"), clean[1] if stage == "frames" else clean[2])


# -- no permission to write ---------------------------------------------------------------------
def test_unwritable_store_is_one_clear_line_and_resumes_from_the_parts(clean, tmp_path):
    p, wd = trial(clean, tmp_path, "perm")
    (wd / "frames.zarr").mkdir()
    (wd / "frames.zarr").chmod(0o555)  # e.g. made by another user
    res = run_lift3d(["run", "frames", "-c", p], unprivileged=True)
    assert res.returncode == 1, res.out[-2000:]
    line = error_line(res.out)
    assert "frames failed" in line and str(wd / "frames.zarr") in line and "Permission denied" in line, line
    assert "no permission" in line, line
    assert incomplete(wd, "frames")
    (wd / "frames.zarr").chmod(0o755)
    res = run_lift3d(["run", "frames", "-c", p], unprivileged=True)
    assert res.returncode == 0, res.out[-2000:]
    assert re.search(r"3 scenes \(3 already done\)", res.out), res.out[-2000:]  # parts kept, only committed
    assert_same_store(snapshot(wd / "frames.zarr" / "syn"), clean[1])
