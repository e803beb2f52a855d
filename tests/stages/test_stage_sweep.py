"""Sweeps: the grid, runs in their own folders, upstream never re-run, refusal without caches."""

import pytest
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.train.sweep import SweepError, grid, run_sweep, split_values
from tests.fixtures.config import write_config
from tests.fixtures.stores import run_stages

TINY = {
    "datasets": [
        {
            "name": "tiny",
            "kind": "synthetic",
            "root": None,
            "frame_skip": 1,
            "split": "all",
            "scenes": 1,
            "seed": 0,
            "frames_per_scene": 6,
            "depth_size": [48, 64],
        }
    ],
    "cluster": {"n_workers": 0},
    "teacher": {"device": "cpu", "batch_size": 6, "input_size": [64, 96]},
    "pretrain": {
        "model": "Res16UNet14",
        "feature_dim": 8,
        "proj_dim": 8,
        "voxel_size": 0.25,
        "batch_size": 2,
        "n_sub": 32,
        "iterations": 2,
        "device": "cpu",
    },
    "sweeps": {"temps": {"pretrain.temperature": [0.04, 0.07]}},
}


def test_grid_is_the_cartesian_product():
    assert split_values("0.1, 0.5") == ["0.1", "0.5"] and split_values("[64, 96]") == ["[64, 96]"]
    g = grid(["pretrain.lr=0.1,0.5", "pretrain.temperature=0.04,0.07,0.1"])
    assert len(g) == 6
    assert g[0] == ["pretrain.lr=0.1", "pretrain.temperature=0.04"]
    assert g[-1] == ["pretrain.lr=0.5", "pretrain.temperature=0.1"]
    assert grid([], {"pretrain.temperature": [0.04, 0.07]}) == [
        ["pretrain.temperature=0.04"],
        ["pretrain.temperature=0.07"],
    ]
    with pytest.raises(SweepError, match="swept twice"):
        grid(["pretrain.lr=0.1,0.2", "pretrain.lr=0.3"])
    with pytest.raises(SweepError, match="nothing to sweep"):
        grid([])


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    p, _ = write_config(tmp_path_factory.mktemp("sweep"), "w", TINY)  # workdir: the folder's w/
    return p


def test_sweep_refuses_without_caches_and_never_runs_upstream(cfg_file):
    with pytest.raises(SweepError, match="upstream stage 'teacher' is missing.*never runs it"):
        run_sweep("pretrain", cfg_file, ["pretrain.temperature=0.04,0.07"])
    res = CliRunner().invoke(main, ["sweep", "pretrain", "-c", str(cfg_file), "-o", "pretrain.temperature=0.04,0.07"])
    assert res.exit_code != 0 and "never runs it" in res.output
    assert not (cfg_file.parent / "w" / "teacher.zarr").exists()


def test_sweep_runs_each_combination_in_its_own_folder(cfg_file):
    from lift3d.core import config as C

    cfg = C.load(cfg_file)
    run_stages(cfg, "frames", "teacher", "points")
    wd = cfg_file.parent / "w"
    stamps = {p: p.stat().st_mtime_ns for p in wd.glob("*.zarr/**/zarr.json")}
    rows = run_sweep("pretrain", cfg_file, ["pretrain.lr=0.1,0.05"], name="temps")
    assert len(rows) == 4
    assert {(r["pretrain.temperature"], r["pretrain.lr"]) for r in rows} == {
        ("0.04", "0.1"),
        ("0.04", "0.05"),
        ("0.07", "0.1"),
        ("0.07", "0.05"),
    }
    dirs = {r["run_dir"] for r in rows}
    assert len(dirs) == 4 and all(r["steps"] == 2 for r in rows)
    assert {p: p.stat().st_mtime_ns for p in wd.glob("*.zarr/**/zarr.json")} == stamps  # caches untouched
    # re-running the sweep finds every run done
    again = run_sweep("pretrain", cfg_file, ["pretrain.lr=0.1,0.05"], name="temps")
    assert {r["status"] for r in again} != {"trained"}
