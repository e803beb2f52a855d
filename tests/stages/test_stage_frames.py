"""The frames stage end to end on the synthetic dataset (ScanNet's raw format)."""

import os

import numpy as np
import pytest
import zarr

from lift3d.core.cluster import TaskError
from lift3d.core.errors import StoreError
from lift3d.pipeline import frames as F
from lift3d.pipeline.readers.scannet import Reader as ScanNetReader
from tests.fixtures.config import make_cfg
from tests.fixtures.scannet_bytes import read_header

TINY = [
    "datasets.0.scenes=2",
    "datasets.0.frames_per_scene=24",
    "datasets.0.depth_size=[48, 64]",
    "datasets.0.split=all",
]  # on the default dataset (kind synthetic); make_cfg runs the stage in this process


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][...] for k in g.array_keys()}, dict(g.attrs)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("clean")
    cfg = make_cfg(wd, *TINY)
    rows = F.run(cfg)
    return wd, cfg, rows


def test_store_matches_the_raw_files(clean_run):
    wd, cfg, rows = clean_run
    got, attrs = arrays(wd / "frames.zarr" / "synthetic")
    entry = cfg["datasets"][0]
    # independent expectation: the ScanNet reader on the generated .sens, frame by frame
    reader = ScanNetReader({**entry, "kind": "scannet", "root": str(wd / "raw" / "synthetic")}, wd)
    expect, skipped = [], 0
    for s_i, scene in enumerate(sorted(reader.scenes())):
        for fr in reader.frames(scene, entry["frame_skip"]):
            if hasattr(fr, "rgb"):
                expect.append((s_i, fr))
            else:
                skipped += 1
    assert len(expect) == got["rgb"].shape[0] == rows[0]["frames"]
    # frame_skip 5 over 24 frames keeps 0, 5, 10, 15, 20 and index 20 has a -inf pose
    assert got["source_index"].tolist() == [0, 5, 10, 15] * 2
    assert attrs["skipped"] == {"nonfinite_pose": skipped} == {"nonfinite_pose": 2}
    for row, (s_i, fr) in enumerate(expect):
        assert got["scene_index"][row] == s_i
        np.testing.assert_array_equal(got["rgb"][row], fr.rgb)
        np.testing.assert_array_equal(got["depth"][row], fr.depth)
        np.testing.assert_array_equal(got["pose"][row], fr.pose)
    assert got["rgb"].dtype == np.uint8 and got["depth"].dtype == np.uint16
    assert got["intrinsics"].dtype == np.float32 and got["pose"].dtype == np.float32
    assert got["projection"].tolist() == [0] * len(expect)
    # the depth intrinsics from the .sens header, read with struct (name, then 4 matrices)
    raw = (wd / "raw" / "synthetic" / "scans" / "scene0000_00" / "scene0000_00.sens").read_bytes()
    k = read_header(raw)["depth_k"]
    np.testing.assert_allclose(got["intrinsics"][0], [k[0, 0], k[1, 1], k[0, 2], k[1, 2]])
    assert attrs["scenes"] == ["scene0000_00", "scene0001_00"]
    assert attrs["stored_size"] == [48, 64]


def test_rerun_is_a_noop(clean_run):
    wd, cfg, _ = clean_run
    before = (wd / "frames.zarr" / "synthetic" / "zarr.json").stat().st_mtime_ns
    rows = F.run(cfg)
    assert rows[0]["status"] == "up to date"
    assert (wd / "frames.zarr" / "synthetic" / "zarr.json").stat().st_mtime_ns == before


def test_interrupted_run_resumes_to_the_same_store(clean_run, tmp_path, monkeypatch):
    wd0, _, _ = clean_run
    cfg = make_cfg(tmp_path, *TINY)
    calls = []
    real = F.scene_task

    def dies_on_second(*args):
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(F, "scene_task", dies_on_second)
    with pytest.raises(TaskError, match="scene0001_00"):
        F.run(cfg)
    assert not (tmp_path / "frames.zarr" / "synthetic").exists()  # nothing looks complete
    monkeypatch.setattr(F, "scene_task", lambda *a: calls.append(a[2]) or real(*a))
    F.run(cfg)
    assert calls[2:] == ["scene0001_00"]  # the finished scene was not redone
    a, attrs_a = arrays(wd0 / "frames.zarr" / "synthetic")
    b, attrs_b = arrays(tmp_path / "frames.zarr" / "synthetic")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for key in ("config_sha256", "lineage_sha256", "skipped", "scenes"):
        assert attrs_a[key] == attrs_b[key]


def test_dask_workers_give_the_same_store(clean_run, tmp_path):
    wd0, _, _ = clean_run
    cfg = make_cfg(tmp_path, *TINY, "cluster.n_workers=2", "cluster.memory_limit=2GiB")
    F.run(cfg)
    a, _ = arrays(wd0 / "frames.zarr" / "synthetic")
    b, _ = arrays(tmp_path / "frames.zarr" / "synthetic")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_changed_config_rebuilds_and_drops_stale_parts(clean_run, tmp_path):
    cfg = make_cfg(tmp_path, *TINY)
    F.run(cfg)
    stale = tmp_path / ".parts" / "frames" / "synthetic" / "0123456789abcdef"
    stale.mkdir(parents=True)
    cfg2 = make_cfg(tmp_path, *TINY, "datasets.0.frame_skip=3")
    with pytest.raises(StoreError, match=r"frame_skip: 5 -> 3.*--rebuild"):  # a complete store is not replaced silently
        F.run(cfg2)
    cfg2["rebuild"] = True
    rows = F.run(cfg2)
    assert rows[0]["status"] == "written"
    got, attrs = arrays(tmp_path / "frames.zarr" / "synthetic")
    assert all(s % 3 == 0 for s in got["source_index"])
    assert attrs["config"]["dataset"]["frame_skip"] == 3
    assert not stale.exists()


def test_local_cluster_workers_get_heap_malloc_and_one_opencv_thread():
    """The nanny's MALLOC_TRIM_THRESHOLD_ alone would freeze glibc's mmap threshold at 128 KiB
    (every frame buffer mmap'ed); lift3d's LocalCluster sets both thresholds, and the workers
    pin OpenCV to their own thread count before any task."""
    from lift3d.core.cluster import dask_client, init_worker
    from lift3d.launch import MALLOC_ENV

    def probe():
        import cv2

        return {k: os.environ.get(k) for k in MALLOC_ENV} | {"cv2": cv2.getNumThreads()}

    with dask_client({"n_workers": 1, "threads_per_worker": 1, "memory_limit": "1GiB"}) as client:
        client.run(init_worker, "lift3d.pipeline.frames")
        (got,) = client.run(probe).values()
    assert got == {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "cv2": 1}
