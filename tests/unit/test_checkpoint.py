"""Reading torch files safely: plain tensors and containers load, a pickle that would run code
is refused with a message naming the file, every RNG round-trips, and the registries."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from lift3d.core import checkpoint as ckpt
from lift3d.core.errors import CheckpointError, FinetuneError, Lift3dError, ReaderError
from lift3d.core.registry import READERS, STAGES, Registry, RegistryError


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_checkpoint_loads(tmp_path):
    obj = {"model": {"w": torch.arange(3.0)}, "model_name": "Res16UNet14A", "steps": 2, "classes": ["a", "b"]}
    torch.save(obj, tmp_path / "model.pt")
    back = ckpt.load(tmp_path / "model.pt")
    assert back["model_name"] == "Res16UNet14A" and torch.equal(back["model"]["w"], torch.arange(3.0))
    assert ckpt.read_model_file(tmp_path)["path"] == str(tmp_path / "model.pt")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {}, "evil": RunsCode(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: refused: .*could run code"):
        ckpt.load(tmp_path / "model.pt")
    assert not marker.exists()
    # every reader of model.pt goes through the same loader, with its stage's error class
    from lift3d.train.finetune import read_model_file

    with pytest.raises(FinetuneError, match="refused"):
        read_model_file(tmp_path)
    assert not marker.exists()
    assert issubclass(FinetuneError, Lift3dError) and issubclass(CheckpointError, Lift3dError)


def test_numpy_arrays_only_where_allowed(tmp_path):
    """ScanNet's limited-annotation files may hold numpy arrays: allowed there, and only there."""
    torch.save({"scene0000_00": np.array([3, 1, 2], np.int64)}, tmp_path / "la.pth")
    assert ckpt.load(tmp_path / "la.pth", numpy=True)["scene0000_00"].tolist() == [3, 1, 2]
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load(tmp_path / "la.pth")
    torch.save({"scene0000_00": RunsCode(tmp_path / "ran")}, tmp_path / "bad.pth")
    with pytest.raises(ReaderError, match="refused"):
        ckpt.load(tmp_path / "bad.pth", numpy=True, error=ReaderError)
    assert not (tmp_path / "ran").exists()


def test_truncated_file_names_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot be read as"):
        ckpt.load(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"nothing\.pt: no such file"):
        ckpt.load(tmp_path / "nothing.pt")


def test_every_rng_round_trips_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "c.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_registries():
    assert READERS.names() == sorted(
        ["scannet", "scannet_export", "sunrgbd", "matterport", "matterport_pano", "synthetic"]
    )
    assert READERS.get("scannet").kind == "scannet"
    assert hasattr(STAGES.get("frames"), "run")
    with pytest.raises(RegistryError, match="unknown dataset kind 'nope'; valid: matterport, "):
        READERS.get("nope")
    reg = Registry("thing", "lift3d.no-such-group")

    @reg.register("mine")
    class Mine:
        pass

    assert reg.get("mine") is Mine and reg.names() == ["mine"] and "mine" in reg
