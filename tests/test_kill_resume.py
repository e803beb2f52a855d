"""Fault injection: SIGKILL the frames and points stages at random moments, re-run, compare.

Each trial starts `lift3d run STAGE` as its own process, kills it after a random delay (the
seeds are fixed and printed), re-runs it to the end, and asserts the store equals the one from
an uninterrupted run, with every expected frame present exactly once.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr

TINY = {"datasets": [{"name": "syn", "kind": "synthetic", "root": None, "frame_skip": 2, "split": "all",
                      "scenes": 3, "seed": 1, "frames_per_scene": 24, "depth_size": [48, 64]}],
        "cluster": {"n_workers": 0}}
KEYS = ("config_sha256", "lineage_sha256", "skipped", "scenes", "complete")


def lift3d(cfg_path, stage, check=True, kill_after=None):
    cmd = [sys.executable, "-m", "lift3d.cli", "run", stage, "-c", str(cfg_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    if kill_after is not None:
        time.sleep(kill_after)
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
        # a clean frames run takes ~3 s here (~1 s of it imports), points ~1 s: land inside the work
        for stage, window in (("frames", (0.8, 2.8)), ("points", (0.6, 1.2))):
            rc = lift3d(p, stage, kill_after=float(rng.uniform(*window)))
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
    assert interrupted["frames"] >= 2 and interrupted["points"] >= 2, interrupted
