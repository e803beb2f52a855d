"""`lift3d export --format pointcontrast` against PointContrast's Res16UNet34C key/shape manifest."""

import json

import torch
from click.testing import CliRunner

from lift3d.cli import main
from tests.fixtures import POINTCONTRAST_MANIFEST
from tests.fixtures.models import write_model_file

MANIFEST = json.loads(POINTCONTRAST_MANIFEST.read_text())


def save_run(tmp_path, name="Res16UNet34C", out=32, claim=None):
    run = tmp_path / "run"
    run.mkdir()
    sd = write_model_file(run / "model.pt", name, out, model_name=claim or name, method="ppnce", steps=1)
    return run, sd


def test_export_matches_the_manifest_and_the_weights(tmp_path):
    run, sd = save_run(tmp_path)
    res = CliRunner().invoke(main, ["export", str(run), "--format", "pointcontrast", "--out", str(tmp_path / "pc.pth")])
    assert res.exit_code == 0, res.output
    got = torch.load(tmp_path / "pc.pth", weights_only=True)
    assert [(k, list(v.shape)) for k, v in got.items()] == [(k, list(s)) for k, s in MANIFEST["entries"]]
    for k, v in got.items():
        assert torch.equal(v, sd[k])


def test_export_errors_are_clear(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_text("not torch")
    res = CliRunner().invoke(main, ["export", str(bad), "--out", str(tmp_path / "x.pth")])
    assert res.exit_code != 0 and "junk.pt: cannot be read as a torch file" in res.output
    run, _ = save_run(tmp_path, name="Res16UNet14", out=8, claim="Res16UNet34C")
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "y.pth")])
    assert res.exit_code != 0 and "do not fit the recorded model 'Res16UNet34C'" in res.output
    assert not (tmp_path / "y.pth").exists()
