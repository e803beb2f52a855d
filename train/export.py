"""Export a pretrained 3D network for other code bases (``lift3d export``).

``pointcontrast``: a plain state dict whose key names and shapes are those of PointContrast /
CSC's Res16UNet family (their ``Res16UNet34C(3, out)`` for the paper preset), loadable with
``model.load_state_dict`` there. Input: a pretrain run folder, its ``model.pt``, or a
``checkpoint.pt`` (resume state), of either sparse backend: a spconv network's weights are
converted to MinkowskiEngine's layout, which is PointContrast's (:mod:`lift3d.nets.convert`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lift3d.core.checkpoint import read_model_file
from lift3d.core.errors import ExportError
from lift3d.nets.convert import spconv_to_minkowski
from lift3d.nets.res16unet import MODELS, build_model, export_pointcontrast, load_pointcontrast
from lift3d.nets.sparse import checkpoint_backend

FORMATS = ("pointcontrast",)


def read_network(path: str | Path) -> tuple[dict, str | None, int | None]:
    """(state dict in MinkowskiEngine's layout, model name or None, out channels or None) from a
    run folder or file."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise ExportError(f"{p}: not found (give a pretrain run folder, its model.pt or checkpoint.pt)")
    obj = read_model_file(p, error=ExportError, accept_checkpoint=True)
    try:
        backend = checkpoint_backend(obj)
    except ValueError as exc:
        raise ExportError(f"{p}: {exc}") from None
    sd = spconv_to_minkowski(obj["model"]) if backend == "spconv" else obj["model"]
    return sd, obj.get("model_name"), obj.get("out_channels")


def export(path: str | Path, out: str | Path, fmt: str = "pointcontrast") -> dict:
    """Write the network of ``path`` in ``fmt`` to ``out``; returns a short report."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    sd, name, out_ch = read_network(path)
    exported = export_pointcontrast(sd)
    if name is not None:  # prove it loads into the same architecture, as the other code base will
        if name not in MODELS:
            raise ExportError(f"{path}: model {name!r} is not a known network ({', '.join(sorted(MODELS))})")
        in_ch = int(exported["conv0p1s1.kernel"].shape[1]) if "conv0p1s1.kernel" in exported else 3
        net = build_model(name, in_ch, int(out_ch or exported["final.kernel"].shape[-1]))
        try:
            load_pointcontrast(net, exported, skip_mismatched_final=False)
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{path}: the weights do not fit the recorded model {name!r}: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(exported, tmp)
    tmp.replace(out)
    return {
        "format": fmt,
        "model": name,
        "keys": len(exported),
        "parameters": sum(v.numel() for v in exported.values()),
        "out": str(out),
    }
