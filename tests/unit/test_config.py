"""Config merging, overrides, validation errors, and the stage up-to-date logic."""

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.core.store import GroupWriter, PartWriter, StoreError, open_group, stage_lock


def write_cfg(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "user.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_user_file_sets_only_what_it_changes(tmp_path):
    p = write_cfg(tmp_path, {"workdir": str(tmp_path / "w"), "points": {"voxel_size": 0.05}})
    cfg = C.load(p)
    base = C.defaults()
    assert cfg["workdir"] == str(tmp_path / "w")
    assert cfg["points"]["voxel_size"] == 0.05
    assert cfg["points"]["max_depth"] == base["points"]["max_depth"]  # untouched sibling kept
    assert cfg["teacher"] == base["teacher"]


def test_lists_replace_and_dataset_defaults(tmp_path):
    p = write_cfg(tmp_path, {"datasets": [{"name": "s", "kind": "scannet", "root": "/data/scannet"}]})
    cfg = C.load(p)
    assert [d["name"] for d in cfg["datasets"]] == ["s"]
    assert cfg["datasets"][0]["frame_skip"] == 25  # ScanNet's usual subsampling
    assert cfg["datasets"][0]["split"] == "all"


def test_reader_defaults_enter_the_identity(tmp_path):
    """A reader's default for an unset key (Matterport's cy_origin) is filled into the entry, so
    the frames group's identity changes with it and an explicit setting hashes the same."""
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump({"datasets": [{"name": "m", "kind": "matterport", "root": "/data/mp"}]}))
    implicit = C.load(f)
    assert implicit["datasets"][0]["cy_origin"] == "bottom"
    explicit = C.load(f, ["datasets.0.cy_origin=bottom"])
    top = C.load(f, ["datasets.0.cy_origin=top"])
    sha = [S.groups(c, "frames")[0].config_sha256 for c in (implicit, explicit, top)]
    assert sha[0] == sha[1] != sha[2]
    assert "cy_origin" not in C.load(None)["datasets"][0]  # kinds without defaults are unchanged


def test_overrides_parse_yaml_and_index_lists():
    cfg = C.load(
        None,
        [
            "points.voxel_size=0.1",
            "datasets.0.frame_skip=10",
            "teacher.input_size=[64, 96]",
            "cluster.scheduler=tcp://h:8786",
        ],
    )
    assert cfg["points"]["voxel_size"] == 0.1
    assert cfg["datasets"][0]["frame_skip"] == 10
    assert cfg["teacher"]["input_size"] == [64, 96]
    assert cfg["cluster"]["scheduler"] == "tcp://h:8786"


def test_float_key_accepts_int_but_int_key_rejects_float_and_bool():
    assert C.load(None, ["points.voxel_size=1"])["points"]["voxel_size"] == 1
    with pytest.raises(C.ConfigError, match=r"teacher\.batch_size: got 2\.5 .*expected integer"):
        C.load(None, ["teacher.batch_size=2.5"])
    with pytest.raises(C.ConfigError, match=r"teacher\.batch_size: got True"):
        C.load(None, ["teacher.batch_size=true"])


def test_unknown_key_names_itself_and_valid_keys(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["points.voxelsize=0.1"])
    msg = str(e.value)
    assert "'points.voxelsize'" in msg and "max_depth" in msg and "voxel_size" in msg
    with pytest.raises(C.ConfigError, match="unknown key 'nonsense'"):
        C.load(write_cfg(tmp_path, {"nonsense": 1}))


def test_dataset_entry_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown kind 'scanet'"):
        C.load(write_cfg(tmp_path, {"datasets": [{"name": "a", "kind": "scanet", "root": "/x"}]}))
    with pytest.raises(C.ConfigError, match="needs 'root'"):
        C.load(write_cfg(tmp_path, {"datasets": [{"name": "a", "kind": "scannet"}]}))
    with pytest.raises(C.ConfigError, match=r"datasets\.0\.frame_skip: got 'x'"):
        C.load(write_cfg(tmp_path, {"datasets": [{"name": "a", "kind": "scannet", "root": "/x", "frame_skip": "x"}]}))
    with pytest.raises(C.ConfigError, match="split"):
        C.load(write_cfg(tmp_path, {"datasets": [{"name": "a", "kind": "scannet", "root": "/x", "split": "test1"}]}))
    with pytest.raises(C.ConfigError, match="used twice"):
        C.load(
            write_cfg(
                tmp_path,
                {
                    "datasets": [
                        {"name": "a", "kind": "scannet", "root": "/x"},
                        {"name": "a", "kind": "scannet", "root": "/y"},
                    ]
                },
            )
        )
    with pytest.raises(C.ConfigError, match=r"unknown key datasets\.0\.'colour'"):
        C.load(write_cfg(tmp_path, {"datasets": [{"name": "a", "kind": "scannet", "root": "/x", "colour": 1}]}))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="key.path=value"):
        C.load(None, ["points.voxel_size"])
    with pytest.raises(C.ConfigError, match="index 5 out of range"):
        C.load(None, ["datasets.5.root=/x"])
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")


def _fake_frames_group(wd: Path, cfg: dict, name: str, n: int = 3, done: bool = True):
    g = S.groups(cfg, "frames")[0]
    w = GroupWriter(wd, "frames", name, g.config)
    w.prepare_parts()
    pw = PartWriter(w.part_path("scene0000_00"))
    pw.append(
        source_index=np.arange(n, dtype=np.int32),
        scene_index=np.zeros(n, np.int32),
        depth=np.full((n, 2, 3), 1000, np.uint16),
    )
    pw.skipped["nonfinite_pose"] += 2
    pw.finish({})
    if done:
        w.commit(["scene0000_00"], attrs={})
    return w


def test_stage_status_follows_identity(tmp_path):
    wd = tmp_path / "w"
    cfg = C.load(None, [f"workdir={wd}"])
    assert S.stage_status(cfg, "frames")[0] == "missing"
    w = _fake_frames_group(wd, cfg, "synthetic")
    assert S.stage_status(cfg, "frames")[0] == "done"
    attrs = dict(zarr.open_group(str(w.path), mode="r").attrs)
    # the contract's attributes
    assert attrs["config_sha256"] == C.sha256_json(attrs["config"])
    assert attrs["skipped"] == {"nonfinite_pose": 2}
    assert attrs["complete"] is True and attrs["schema_version"] == 1
    # a trainer setting does not touch preprocessing; a frames setting does, and says which key
    assert S.stage_status(C.load(None, [f"workdir={wd}", "pretrain.lr=0.3"]), "frames")[0] == "done"
    state, why = S.stage_status(C.load(None, [f"workdir={wd}", "datasets.0.frame_skip=7"]), "frames")
    assert state == "out of date" and "dataset.frame_skip: 5 -> 7" in why[0]
    # downstream: points depends on frames' lineage
    pcfg = C.load(None, [f"workdir={wd}", "frames.chunk_frames=2"])  # frames' own section only
    g = S.groups(cfg, "points")[0]
    pw_ = GroupWriter(
        wd,
        "points",
        "synthetic",
        g.config,
        upstream_sha256=g.upstream.config_sha256,
        upstream_lineage=g.upstream.lineage_sha256,
    )
    pw_.prepare_parts()
    PartWriter(pw_.part_path("scene0000_00")).finish({"counts": ((), np.int64)})
    pw_.commit(["scene0000_00"], attrs={}, ragged=("coords",))
    assert S.stage_status(cfg, "points")[0] == "done"
    state, why = S.stage_status(pcfg, "points")
    assert state == "out of date" and "upstream frames.zarr/synthetic changed" in why[0]


def test_reader_refuses_incomplete_and_stale_groups(tmp_path):
    wd = tmp_path / "w"
    cfg = C.load(None, [f"workdir={wd}"])
    with pytest.raises(StoreError, match="lift3d run frames"):
        open_group(wd, "frames", "synthetic")
    w = _fake_frames_group(wd, cfg, "synthetic")
    zarr.open_group(str(w.path), mode="a").attrs["complete"] = False
    with pytest.raises(StoreError, match="not marked complete"):
        open_group(wd, "frames", "synthetic")
    w = _fake_frames_group(wd, cfg, "synthetic")
    with pytest.raises(StoreError, match="another configuration"):
        open_group(wd, "frames", "synthetic", expect_lineage="0" * 64)
    assert open_group(wd, "frames", "synthetic", expect_lineage=w.lineage_sha256)["source_index"].shape == (3,)


def test_commit_orders_scenes_and_rewrites_scene_index(tmp_path):
    wd = tmp_path / "w"
    w = GroupWriter(wd, "frames", "d", {"x": 1})
    w.prepare_parts()
    for scene, n in [("b", 2), ("a", 3), ("c", 0)]:
        pw = PartWriter(w.part_path(scene))
        if n:
            pw.append(source_index=np.arange(n, dtype=np.int32) * 10, scene_index=np.full(n, 99, np.int32))
        pw.finish({"source_index": ((), np.int32), "scene_index": ((), np.int32)})
    w.commit(["b", "c", "a"], attrs={})
    g = zarr.open_group(str(w.path), mode="r")
    assert g.attrs["scenes"] == ["a", "b", "c"]
    assert g["scene_index"][...].tolist() == [0, 0, 0, 1, 1]
    assert g["source_index"][...].tolist() == [0, 10, 20, 0, 10]


def test_second_process_is_refused_while_a_stage_runs(tmp_path):
    with stage_lock(tmp_path, "frames"):
        # flock is per open file description: a second open in this process conflicts too
        with pytest.raises(StoreError, match="already running"):
            with stage_lock(tmp_path, "frames"):
                pass
    with stage_lock(tmp_path, "frames"):  # released after the first
        pass


def test_cli_help_status_and_config_error(tmp_path):
    r = CliRunner()
    assert r.invoke(main, ["--help"]).exit_code == 0
    res = r.invoke(main, ["run", "--help"])
    assert res.exit_code == 0 and "STAGE" in res.output
    res = r.invoke(main, ["status", "-o", f"workdir={tmp_path}"])
    assert res.exit_code == 0, res.output
    assert "frames" in res.output and "missing" in res.output
    res = r.invoke(main, ["status", "-o", "points.voxelsize=1"])
    assert res.exit_code != 0 and "unknown key 'points.voxelsize'" in res.output


def test_cli_reports_missing_stores_in_one_line(tmp_path):
    r = CliRunner()
    for args in (["eval", "teacher"], ["show", "synthetic", "0"]):
        res = r.invoke(main, args + ["-o", f"workdir={tmp_path}", "-o", "cluster.n_workers=0"])
        assert res.exit_code != 0
        assert "failed:" in res.output and "Traceback" not in res.output, res.output
