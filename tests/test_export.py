"""`lift3d export --format pointcontrast` against PointContrast's Res16UNet34C key/shape manifest."""

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from lift3d.cli import main
from lift3d.nets.res16unet import build_model

MANIFEST = json.loads((Path(__file__).resolve().parent / "fixtures" / "pointcontrast_manifest.json").read_text())


def save_run(tmp_path, name="Res16UNet34C", out=32, claim=None):
    torch.manual_seed(0)
    net = build_model(name, 3, out)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(
        {
            "model": net.state_dict(),
            "model_name": claim or name,
            "in_channels": 3,
            "out_channels": out,
            "method": "ppnce",
            "steps": 1,
        },
        run / "model.pt",
    )
    return run, net.state_dict()


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
