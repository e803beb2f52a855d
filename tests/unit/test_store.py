"""The part writer's direct row chunks and the committer's hard links, read back with plain zarr."""

from __future__ import annotations

import os

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from lift3d.core.store import GroupWriter, PartWriter


def _rows(rng, n):
    return {
        "rgb": rng.integers(0, 256, (n, 6, 7, 3), dtype=np.uint8),
        "depth": rng.integers(0, 65535, (n, 6, 7), dtype=np.uint16),
        "sl/prob": rng.random((n, 2, 3)).astype(np.float16),
        "idx": np.arange(n, dtype=np.int32) * 7 - 3,
        "pose": rng.random((n, 4, 4)).astype(np.float32),
    }


TEMPLATES = {
    "rgb": ((6, 7, 3), np.uint8),
    "depth": ((6, 7), np.uint16),
    "sl/prob": ((2, 3), np.float16),
    "idx": ((), np.int32),
    "pose": ((4, 4), np.float32),
    "never": ((5,), np.uint16),
}
DIRECT = ("rgb", "depth", "sl/prob", "idx", "never")


def test_direct_rows_read_back_with_plain_zarr(tmp_path):
    rng = np.random.default_rng(3)
    data = _rows(rng, 5)
    pw = PartWriter(
        tmp_path / "p.zarr", compressors={"rgb": ZstdCodec(level=-1), "depth": ZstdCodec(level=3)}, direct=DIRECT
    )
    pw.append(**{k: v[:2] for k, v in data.items()})  # two appends: rows continue
    pw.append(**{k: v[2:] for k, v in data.items()})
    pw.finish(TEMPLATES, scene="s")
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    for k, v in data.items():
        assert g[k].dtype == v.dtype and g[k].shape == v.shape, k
        np.testing.assert_array_equal(g[k][...], v, err_msg=k)
    assert g["never"].shape == (0, 5)
    assert g["rgb"].compressors == (ZstdCodec(level=-1, checksum=False),)
    assert g["depth"].compressors == (ZstdCodec(level=3, checksum=False),)
    # one file per row in the array's own folder (zarr v3 default keys, "." separator)
    assert sorted(os.listdir(tmp_path / "p.zarr" / "rgb")) == [
        "c.0.0.0.0",
        "c.1.0.0.0",
        "c.2.0.0.0",
        "c.3.0.0.0",
        "c.4.0.0.0",
        "zarr.json",
    ]
    assert sorted(os.listdir(tmp_path / "p.zarr" / "idx")) == ["c.0", "c.1", "c.2", "c.3", "c.4", "zarr.json"]
    # a chunk file is a zstd frame of the row's little-endian bytes
    from numcodecs import Zstd

    raw = Zstd().decode((tmp_path / "p.zarr" / "depth" / "c.3.0.0").read_bytes())
    np.testing.assert_array_equal(np.frombuffer(raw, "<u2").reshape(6, 7), data["depth"][3])


def test_direct_write_refuses_rows_of_another_shape(tmp_path):
    pw = PartWriter(tmp_path / "p.zarr", direct=("rgb",))
    pw.append(rgb=np.zeros((1, 4, 4, 3), np.uint8))
    try:
        pw.append(rgb=np.zeros((1, 4, 5, 3), np.uint8))
    except ValueError as exc:
        assert "rgb" in str(exc) and "(4, 5, 3)" in str(exc)
    else:
        raise AssertionError("a row of another shape was accepted")


def test_commit_links_direct_chunks_and_gathers_small_arrays(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    w = GroupWriter(tmp_path, "frames", "d", {"x": 1})
    w.prepare_parts()
    per_scene = {"b": _rows(rng, 3), "a": _rows(rng, 2), "c": _rows(rng, 0)}
    for scene, data in per_scene.items():
        pw = PartWriter(w.part_path(scene), chunk_rows={"pose": 4096}, direct=DIRECT)
        pw.append(**data, scene_index=np.zeros(len(data["idx"]), np.int32))
        pw.finish({**TEMPLATES, "scene_index": ((), np.int32)}, scene=scene)
    linked = []
    real_link = os.link
    monkeypatch.setattr(os, "link", lambda s, d: (linked.append(os.path.basename(d)), real_link(s, d)))
    w.commit(["c", "a", "b"], attrs={})
    g = zarr.open_group(str(w.path), mode="r")
    order = ["a", "b", "c"]
    for k in per_scene["a"]:
        want = np.concatenate([per_scene[s][k] for s in order])
        np.testing.assert_array_equal(g[k][...], want, err_msg=k)
    np.testing.assert_array_equal(g["scene_index"][...], [0, 0, 1, 1, 1])
    # images and the other direct arrays were linked, never re-encoded: 5 rows x 4 arrays
    chunks = [n for n in linked if n.startswith("c.")]  # (zarr links its own metadata files too)
    assert sorted(n for n in chunks if n.startswith("c.4")) == ["c.4", "c.4.0.0", "c.4.0.0", "c.4.0.0.0"]
    assert len(chunks) == 5 * 4
    assert g["pose"].chunks == (4096, 4, 4)  # small arrays: one write, not one chunk per frame
