"""Batch preprocessing that keeps going: a bad scene does not stop the others, every failure is
reported at the end (and in logs/<stage>-failures.json), a re-run redoes only the failed scenes,
and with skip_failed_scenes the group is committed without them, with each one recorded."""

from __future__ import annotations

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

from lift3d.core import config as C
from lift3d.core import graph as G
from lift3d.core.cluster import TaskFailures
from lift3d.pipeline import frames as F
from lift3d.pipeline import points as P
from lift3d.pipeline.synthetic import generate
from tests.fixtures.scannet_bytes import read_header, set_header_depth_compression

SCENES = ["scene0000_00", "scene0001_00", "scene0002_00"]
TRUNCATED, BAD_DEPTH = "scene0000_00", "scene0002_00"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 scenes in ScanNet's raw format: one .sens truncated to half its size, one whose header
    names a depth compression that does not exist (its depth stream cannot be read)."""
    root = tmp_path_factory.mktemp("raw") / "scannet"
    generate(root, scenes=3, seed=4, depth_size=[24, 32], frames_per_scene=10, mesh_spacing=0.2)
    good = tmp_path_factory.mktemp("good") / "scannet"
    shutil.copytree(root, good)
    sens = root / "scans" / TRUNCATED / f"{TRUNCATED}.sens"
    data = sens.read_bytes()
    sens.write_bytes(data[: len(data) // 2])
    sens = root / "scans" / BAD_DEPTH / f"{BAD_DEPTH}.sens"
    assert read_header(sens.read_bytes())["depth_compression"] == 1  # zlib, as written
    set_header_depth_compression(sens, 7)
    return root, good


def entry(root) -> str:
    return f"datasets=[{{name: scannet, kind: scannet, root: '{root}', split: all, frame_skip: 2}}]"


def cfg_for(wd, root, workers=0, *extra):
    return C.load(None, [f"workdir={wd}", entry(root), f"cluster.n_workers={workers}", *extra])


def parts_done(wd):
    return sorted(
        p.parent.name[: -len(".zarr")]
        for p in Path(wd).glob(".parts/frames/*/*/*.zarr/zarr.json")
        if '"done": true' in p.read_text()
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_every_scene_runs_and_every_failure_is_listed(tmp_path, raw, workers):
    root, _ = raw
    cfg = cfg_for(tmp_path, root, workers)
    with pytest.raises(TaskFailures) as err:
        F.run(cfg)
    msg = str(err.value)
    # one line per failed scene: the scene, the file and the reason
    assert f"{TRUNCATED}: ReaderError: " in msg and f"{TRUNCATED}.sens: truncated" in msg
    assert f"{BAD_DEPTH}: ReaderError: " in msg and "depth compression 7 is not raw (0) or zlib (1)" in msg
    assert "2 of 3 tasks failed" in msg and "Traceback" not in msg
    assert parts_done(tmp_path) == ["scene0001_00"]  # the good scene's part is written and kept
    assert not (tmp_path / "frames.zarr" / "scannet").exists()  # nothing committed
    report = json.loads((tmp_path / "logs" / "frames-failures.json").read_text())
    assert report["failed"] == 2 and not report["skipped"]
    assert [f["task"] for f in report["groups"]["scannet"]] == [TRUNCATED, BAD_DEPTH]
    # a re-run redoes only the failed scenes (the good part is not rewritten)
    part = next(Path(tmp_path).glob(".parts/frames/*/*/scene0001_00.zarr/zarr.json"))
    stamp = part.stat().st_mtime_ns
    with pytest.raises(TaskFailures, match="2 of 2 tasks failed"):
        F.run(cfg)
    assert part.stat().st_mtime_ns == stamp


def test_skip_failed_scenes_commits_without_them_and_downstream_follows(tmp_path, raw):
    broken, good = raw
    root = tmp_path / "raw"  # this test repairs the files: on a copy
    shutil.copytree(broken, root)
    cfg = cfg_for(tmp_path, root, 0, "skip_failed_scenes=true")
    (row,) = F.run(cfg)
    assert row["status"] == "written" and row["skipped"]["failed_scene"] == 2
    g = zarr.open_group(str(tmp_path / "frames.zarr" / "scannet"), mode="r")
    assert g.attrs["complete"] and g.attrs["scenes"] == ["scene0001_00"]
    assert sorted(g.attrs["failed_scenes"]) == [TRUNCATED, BAD_DEPTH]
    assert "truncated" in g.attrs["failed_scenes"][TRUNCATED]
    assert json.loads((tmp_path / "logs" / "frames-failures.json").read_text())["skipped"]
    state, why = G.stage_status(cfg, "frames")
    assert state == "done" and "without 2 failed scene(s)" in why[0]
    # the setting is not part of any identity: turning it off keeps the store up to date
    assert G.stage_status(cfg_for(tmp_path, root, 0), "frames")[0] == "done"
    # points (and the teacher) read the committed scene list: no expectation of a skipped scene
    (prow,) = P.run(cfg)
    pts = zarr.open_group(str(tmp_path / "points.zarr" / "scannet"), mode="r")
    assert prow["frames"] == g["pose"].shape[0] == pts["offsets"].shape[0] - 1
    assert G.stage_status(cfg, "points")[0] == "done"
    # a re-run with the same broken files changes nothing
    (row,) = F.run(cfg)
    assert row["status"] == "up to date"
    # the files are fixed (re-downloaded): the group is rebuilt with them, and points goes out of date
    for scene in (TRUNCATED, BAD_DEPTH):
        shutil.copy(good / "scans" / scene / f"{scene}.sens", root / "scans" / scene / f"{scene}.sens")
    (row,) = F.run(cfg)
    assert row["status"] == "written" and "failed_scene" not in row["skipped"]
    g = zarr.open_group(str(tmp_path / "frames.zarr" / "scannet"), mode="r")
    assert g.attrs["scenes"] == SCENES and "failed_scenes" not in g.attrs
    state, why = G.stage_status(cfg, "points")
    assert state == "out of date" and "upstream frames.zarr/scannet changed" in why[0]
    # and the rebuilt group equals a clean run on good files
    clean = tmp_path / "clean"
    F.run(cfg_for(clean, good, 0))
    ref = zarr.open_group(str(clean / "frames.zarr" / "scannet"), mode="r")
    for name in ("rgb", "depth", "pose", "intrinsics", "scene_index", "source_index"):
        np.testing.assert_array_equal(g[name][...], ref[name][...], err_msg=name)


def test_kill_during_a_keep_going_run_then_rerun_equals_a_clean_run(tmp_path, raw):
    """SIGKILL `lift3d run frames` once the good scene's part is done, re-run (skipping the failed
    scenes): the store equals one uninterrupted run with the same files."""
    root, _ = raw
    cfgs = {}
    for name in ("killed", "clean"):
        wd = tmp_path / name
        cfg = {
            "workdir": str(wd),
            "skip_failed_scenes": True,
            "cluster": {"n_workers": 0},
            "datasets": [{"name": "scannet", "kind": "scannet", "root": str(root), "split": "all", "frame_skip": 2}],
        }
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "lift3d.cli", "run", "frames", "-c"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, str(cfgs["killed"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not parts_done(tmp_path / "killed"):
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    for name in ("killed", "clean"):
        subprocess.run([*cmd, str(cfgs[name])], check=True, env=env, capture_output=True)
    a = zarr.open_group(str(tmp_path / "killed" / "frames.zarr" / "scannet"), mode="r")
    b = zarr.open_group(str(tmp_path / "clean" / "frames.zarr" / "scannet"), mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in b.array_keys():
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


def test_cli_lists_the_failures_in_one_line_each_without_traceback(tmp_path, raw):
    root, _ = raw
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lift3d.cli",
            "run",
            "frames",
            "-o",
            f"workdir={tmp_path}",
            "-o",
            entry(root),
            "-o",
            "cluster.n_workers=2",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "compiled with CPU_ONLY" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("  frames/scannet/")]
    assert lines, res.stderr[-3000:]
    assert [ln.split(":")[0].strip() for ln in lines] == [f"frames/scannet/{TRUNCATED}", f"frames/scannet/{BAD_DEPTH}"]


def test_status_says_the_build_once_and_no_third_party_warning_reaches_the_terminal(tmp_path):
    cmd = [sys.executable, "-m", "lift3d.cli", "status", "-o", f"workdir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    build = [ln for ln in res.stdout.splitlines() if ln.startswith("build:")]
    assert len(build) == 1 and "MinkowskiEngine 0.5.4" in build[0], res.stdout
    assert "Warning" not in res.stderr and "CPU_ONLY" not in res.stderr, res.stderr
