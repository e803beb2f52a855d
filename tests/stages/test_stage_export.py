"""`lift3d export --format pointcontrast` against PointContrast's Res16UNet34C key/shape manifest,
from a network of either sparse backend."""

import json

import pytest
import torch
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.nets.sparse import build_model, sparse_input
from tests.fixtures import POINTCONTRAST_MANIFEST
from tests.fixtures.models import write_model_file

MANIFEST = json.loads(POINTCONTRAST_MANIFEST.read_text())


def save_run(tmp_path, name="Res16UNet34C", out=32, claim=None, backend=None):
    run = tmp_path / "run"
    run.mkdir()
    sd = write_model_file(
        run / "model.pt", name, out, backend=backend, model_name=claim or name, method="ppnce", steps=1
    )
    return run, sd


@pytest.mark.parametrize("backend", [None, "minkowski", "spconv"])
def test_export_matches_the_manifest_and_the_weights(tmp_path, backend):
    run, sd = save_run(tmp_path, backend=backend)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "pointcontrast", "--out", str(tmp_path / "pc.pth")])
    assert res.exit_code == 0, res.output
    got = torch.load(tmp_path / "pc.pth", weights_only=True)
    assert [(k, list(v.shape)) for k, v in got.items()] == [(k, list(s)) for k, s in MANIFEST["entries"]]
    if backend != "spconv":
        for k, v in got.items():
            assert torch.equal(v, sd[k])
        return
    # from spconv: the exported weights in a MinkowskiEngine Res16UNet34C compute what the spconv
    # network computes (the export is loadable by PointContrast's code and means the same network)
    torch.manual_seed(1)
    sp = build_model("Res16UNet34C", 3, 32, backend="spconv")
    sp.load_state_dict(sd)
    me = build_model("Res16UNet34C", 3, 32)
    me.load_state_dict(got)
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(-8, 8, (300, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1).int()
    feats = torch.randn(len(coords), 3, generator=g)
    with torch.no_grad():
        want = sp.eval()(sparse_input(feats, coords, "spconv")).F
        have = me.eval()(sparse_input(feats, coords)).F
    assert (have - want).abs().max() <= 1e-4 * want.abs().max()


def test_export_errors_are_clear(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_text("not torch")
    res = CliRunner().invoke(main, ["export", str(bad), "--out", str(tmp_path / "x.pth")])
    assert res.exit_code != 0 and "junk.pt: cannot be read as a torch file" in res.output
    run, _ = save_run(tmp_path, name="Res16UNet14", out=8, claim="Res16UNet34C")
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "y.pth")])
    assert res.exit_code != 0 and "do not fit the recorded model 'Res16UNet34C'" in res.output
    assert not (tmp_path / "y.pth").exists()
