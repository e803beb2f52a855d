"""Fault injection: SIGKILL the frames and points stages at random moments, re-run, compare.

Each trial starts `lift3d run STAGE` as its own process, kills it once a random number of its
scene parts are done (seeded), re-runs it to the end, and asserts the store equals the one from
an uninterrupted run, with every expected frame present exactly once.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

TINY = {"datasets": [{"name": "syn", "kind": "synthetic", "root": None, "frame_skip": 2, "split": "all",
                      "scenes": 3, "seed": 1, "frames_per_scene": 24, "depth_size": [48, 64]}],
        "cluster": {"n_workers": 0}}
KEYS = ("config_sha256", "lineage_sha256", "skipped", "scenes", "complete")


def done_parts(wd, stage):
    return sum('"done": true' in p.read_text() for p in wd.glob(f".parts/{stage}/syn/*/*/zarr.json"))


def lift3d(cfg_path, stage, check=True, kill_at=None):
    """Run a stage; with ``kill_at=(k, delay)``, SIGKILL it ``delay`` s after its k-th scene part is
    done (k past the last part lands in the commit). Returns the exit code."""
    cmd = [sys.executable, "-m", "lift3d.cli", "run", stage, "-c", str(cfg_path)]
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


def snapshot(path):
    g = zarr.open_group(str(path), mode="r")
    arrays = {}
    stack = [("", g)]
    while stack:
        prefix, node = stack.pop()
        for k in node.array_keys():
            arrays[prefix + k] = node[k][...]
        for k in node.group_keys():
            stack.append((prefix + k + "/", node[k]))
    return arrays, {k: g.attrs.get(k) for k in KEYS}


def config(tmp_path, name):
    wd = tmp_path / name
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({**TINY, "workdir": str(wd)}))
    return p, wd


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    p, wd = config(tmp, "clean")
    lift3d(p, "frames")
    lift3d(p, "points")
    return snapshot(wd / "frames.zarr" / "syn"), snapshot(wd / "points.zarr" / "syn")


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
            assert got[1] == want[1], f"seed {seed}"
            assert got[0].keys() == want[0].keys()
            for k in want[0]:
                np.testing.assert_array_equal(got[0][k], want[0][k], err_msg=f"seed {seed}: {k}")
        arrays, _ = snapshot(wd / "frames.zarr" / "syn")
        pairs = list(zip(arrays["scene_index"].tolist(), arrays["source_index"].tolist()))
        assert len(pairs) == len(set(pairs))  # every frame exactly once
    # the trials really killed running stages (not only finished ones)
    print("interrupted", interrupted)
    assert interrupted["frames"] >= 2 and interrupted["points"] >= 2, interrupted
