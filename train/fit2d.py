"""Stage ``fit2d``: fit a 2D segmentation teacher on labelled 2D frames (``runs/fit2d/<run>``).

The Data-Efficient 3D Learner lifts a *scene parser's* per-pixel class distributions to 3D. This
stage makes one from labelled 2D frames: the project's PSPNet (:class:`lift3d.nets.pspnet.Seg2D`,
the distill2d network) on an ImageNet backbone (EfficientNet-Lite0, embedded, or a local
ResNet-50), trained with per-pixel cross-entropy on the ScanNet-20 classes (the 2D label images
of each corpus dataset, through NYU40: :meth:`BaseReader.labels_2d`).

Corpus. ``fit2d.datasets`` lists dataset entries like ``datasets`` (any kind with 2D label
images: ScanNet's ``label-filt``, the synthetic rooms, ``scannet_export`` label folders, SUN RGB-D).
The frames stage stores their frames (``frames.zarr/<name>``); nothing else reads them. As in the
papers, the teacher learns from a separate 2D dataset: the stage refuses a corpus that shares a
scene with any 3D dataset of ``datasets`` (pretraining frames, fine-tuning train and val rooms).
The last ``holdout`` fraction of each corpus dataset's scenes (sorted; at least one when it has
two or more) is held out; the run reports its 2D mIoU there (``eval.json``).

Run folder (the shared protocol of :mod:`lift3d.train.runs`): ``run.json`` (identity: the
settings and the corpus frames' lineage), ``checkpoint.pt`` (resumable, every RNG),
``metrics.csv``, ``loss.png``, ``eval.json`` and ``model.pt``, the teacher ``teacher.name:
fitted`` loads (:mod:`lift3d.pipeline.teachers.registry`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from lift3d.core.classmaps import IGNORE_INDEX, scannet20_names
from lift3d.core.config import sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.errors import Fit2dError
from lift3d.core.graph import corpus_groups, fit2d_identity, fit2d_run_dir, upstream_problems, uses_fit2d
from lift3d.core.metrics import confusion_with_none as confusion
from lift3d.core.metrics import pixel_scores as scores
from lift3d.core.store import open_group, store_path
from lift3d.nets.pspnet import FIT2D_MODEL_KIND as MODEL_KIND
from lift3d.pipeline.readers.base import make_reader
from lift3d.pipeline.readers.common import to_grid
from lift3d.train.distill2d.cache import NUM_CLASSES, Source
from lift3d.train.distill2d.data import TrainData
from lift3d.train.distill2d.train import train_phase
from lift3d.train.runs import Run, read_csv, read_json, run_lock, run_status, save_json

log = logging.getLogger("lift3d")

PHASE = "fit"


# ----------------------------------------------------------------------------- identity and paths


def run_dir(cfg: dict) -> Path:
    return fit2d_run_dir(cfg)


def upstream(cfg: dict) -> dict:
    return {f"frames.zarr/{g.path}": g.lineage_sha256 for g in corpus_groups(cfg)}


def status(cfg: dict) -> tuple[str, list[str]]:
    if not cfg["fit2d"].get("datasets"):
        if uses_fit2d(cfg):
            return "missing", ["teacher.name is fitted, but fit2d.datasets (the 2D corpus) is empty"]
        return "not used", [f"no fit2d.datasets, and teacher.name is {cfg['teacher']['name']}"]
    d = run_dir(cfg)
    where = f"runs/fit2d/{d.name}"
    state, why, _ = run_status(
        d, where, upstream_problems(cfg, upstream(cfg)), (upstream(cfg), "was made from other corpus frames")
    )
    if state != "done":
        return state, why
    ev = read_json(d / "eval.json") or {}
    miou = ev.get("miou")
    return "done", [f"{where} complete: held-out 2D mIoU {'n/a' if miou is None else f'{100 * miou:.1f} %'}"]


# ----------------------------------------------------------------------------- the corpus


def scene_keys(entry: dict, wd: Path, scenes: list[str] | None = None) -> dict:
    """scene key -> scene for ``scenes`` of a dataset (default: every scene, whichever split:
    pretraining and fine-tuning both read from it). The key says what makes two scenes one
    (:meth:`BaseReader.scene_key`: a synthetic room is its generator seed, a ScanNet scene its id
    whether read raw or exported)."""
    reader = make_reader({**entry, "split": "all"}, wd)
    if scenes is None:
        reader.prepare()
        scenes = list(reader.scenes())
    return {reader.scene_key(s): s for s in scenes}


def check_disjoint(cfg: dict) -> None:
    """Refuse a corpus that shares a scene with a 3D dataset (its pretraining or fine-tuning rooms)."""
    wd = get_workdir(cfg)
    taken: dict[tuple, str] = {}
    for entry in cfg["datasets"]:
        for key, scene in scene_keys(entry, wd).items():
            taken.setdefault(key, f"{entry['name']}/{scene}")
    clashes = [
        f"{entry['name']}/{scene} is {taken[key]}"
        for entry in cfg["fit2d"].get("datasets") or []
        for key, scene in scene_keys(entry, wd).items()
        if key in taken
    ]
    if clashes:
        raise Fit2dError(
            f"fit2d: the 2D corpus shares {len(clashes)} scene(s) with the 3D datasets that pretraining and "
            f"fine-tuning read ({'; '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}): the teacher must "
            f"learn from other scenes (remove them from fit2d.datasets, or give the synthetic corpus another seed)"
        )


def heldout_scenes(scenes: list[str], fraction: float) -> list[str]:
    """The last ``fraction`` of the sorted scenes (at least one when there are two or more)."""
    scenes = sorted(scenes)
    if len(scenes) < 2 or fraction <= 0:
        return []
    n = min(len(scenes) - 1, max(1, int(round(fraction * len(scenes)))))
    return scenes[-n:]


def open_sources(cfg: dict) -> list[Source]:
    """The corpus's verified frames groups, each with its training rows and held-out scenes."""
    f = cfg["fit2d"]
    if not f.get("datasets"):
        raise Fit2dError(
            "fit2d: fit2d.datasets is empty; list the labelled 2D datasets the teacher learns from "
            "(configs/demo.yaml has an example)"
        )
    frac = float(f["holdout"])
    if not 0.0 <= frac < 1.0:
        raise Fit2dError(f"fit2d.holdout must be in [0, 1), got {frac}")
    wd = get_workdir(cfg)
    out = []
    for g in corpus_groups(cfg):
        entry = g.config["dataset"]
        fr = open_group(wd, "frames", g.path, expect_lineage=g.lineage_sha256)
        reader = make_reader(entry, wd)
        if reader.labels_2d() is None:
            raise Fit2dError(
                f"fit2d.datasets: {entry['name']} (kind {entry['kind']}) has no 2D label images to learn from"
            )
        scenes = list(fr.attrs["scenes"])
        held = set(heldout_scenes(scenes, frac))
        scene_index = fr["scene_index"][...]
        is_held = np.array([scenes[s] in held for s in scene_index], bool)
        out.append(
            Source(
                entry,
                str(store_path(wd, "frames") / g.path),
                g.lineage_sha256,
                g.config_sha256,
                Path(reader.root) if reader.root else wd,
                scenes,
                np.flatnonzero(~is_held),
                sorted(held),
                tuple(int(x) for x in fr["rgb"].shape[1:3]),
            )
        )
    if len({s.hw for s in out}) > 1:
        raise Fit2dError(f"fit2d: corpus datasets have different stored sizes {[s.hw for s in out]}; set image_size")
    if sum(len(s.train_rows) for s in out) == 0:
        raise Fit2dError("fit2d: no training frames outside the held-out scenes")
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg: dict, sources: list[Source], net, data: TrainData) -> dict:
    """2D mIoU (ScanNet-20) of ``net`` on the held-out scenes' stored frames: logits upsampled
    bilinearly to the stored size, labels brought to it by the nearest-centre rule."""
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    device = next(net.parameters()).device
    net.eval()
    frames = 0
    for si, src in enumerate(sources):
        fr = zarr.open_group(src.frames_path, mode="r")
        held = set(src.eval_scenes)
        scene_index = fr["scene_index"][...]
        rows = [i for i, s in enumerate(scene_index) if src.scenes[s] in held]
        for a in range(0, len(rows), 8):
            chunk = rows[a : a + 8]
            gts = [data.labels[si](src.scenes[scene_index[r]], int(fr["source_index"][r])) for r in chunk]
            keep = [(r, gt) for r, gt in zip(chunk, gts) if gt is not None]
            if not keep:
                continue
            rgb = np.stack([fr["rgb"][r] for r, _ in keep])
            x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().to(device)
            with torch.no_grad():
                logits = net(x)["logits"]
                pred = F.interpolate(logits, size=src.hw, mode="bilinear", align_corners=False).argmax(1).cpu()
            for (_, gt), p in zip(keep, pred.numpy()):
                g = to_grid(np.asarray(gt), *src.hw).astype(np.int64)
                g[(g < 0) | (g >= NUM_CLASSES)] = IGNORE_INDEX
                conf += confusion(g, p)
                frames += 1
    res = scores(conf, scannet20_names())
    return {**res, "frames": frames, "scenes": {s.entry["name"]: s.eval_scenes for s in sources}}


# ----------------------------------------------------------------------------- the stage


def model_payload(net, f: dict, hw) -> dict:
    """model.pt: the weights and what the fitted teacher needs to rebuild the network."""
    return {
        "kind": MODEL_KIND,
        "model": net.state_dict(),
        "backbone": f["backbone"],
        "num_classes": NUM_CLASSES,
        "classes": scannet20_names(),
        "head_dim": int(f["head_dim"]),
        "input_size": [int(hw[0]), int(hw[1])],
        "steps": int(f["iterations"]),
    }


def train(cfg: dict, stop_at: int | None = None) -> list[dict]:
    """Fit (or resume) the teacher. ``stop_at`` ends after that many steps without completing
    the run (the tests' 'kill')."""
    f = cfg["fit2d"]
    if int(f["batch_size"]) < 2:
        raise Fit2dError("fit2d.batch_size must be >= 2 (batch statistics in the pyramid pooling)")
    if not cfg["fit2d"].get("datasets"):
        open_sources(cfg)  # the message for an empty corpus
    check_disjoint(cfg)
    sources = open_sources(cfg)
    run = Run("fit2d", run_dir(cfg), sha256_json(fit2d_identity(cfg)), upstream(cfg))
    if run.is_done():
        log.info("fit2d: %s is complete and up to date, nothing to do", run.path)
        return _summary_rows(run.path, "up to date", 0.0)
    run.prepare("was made from other settings or corpus frames")
    t0 = time.perf_counter()
    base = {"config": cfg, "steps": int(f["iterations"])}
    run.mark(base, 0, phase=PHASE)
    data = TrainData(cfg, sources, None, section="fit2d")
    try:
        net, rows = train_phase(cfg, PHASE, data, run, None, stop_at, section="fit2d")
        if net is None:
            return _summary_rows(run.path, "stopped", time.perf_counter() - t0)
        ev = evaluate(cfg, sources, net, data)
        if ev["frames"] == 0 and any(s.eval_scenes for s in sources):
            raise Fit2dError(
                f"fit2d: no frame of the held-out scenes ({', '.join(sum((s.eval_scenes for s in sources), []))}) "
                f"has a label image; check the corpus's 2D labels"
            )
    finally:
        for lab in data.labels:
            lab.close()
    ev.update(train_frames=len(data), threads=torch.get_num_threads(), seconds=time.perf_counter() - t0)
    save_json(run.path / "eval.json", ev)
    run.finish(model_payload(net, f, sources[0].hw), base, int(f["iterations"]), rows, "fit2d", phase=PHASE)
    run.checkpoint_path.unlink(missing_ok=True)
    log.info(
        "fit2d: %s trained on %d frames; held-out 2D mIoU %s over %d frames",
        run.path,
        len(data),
        "n/a" if ev["miou"] is None else f"{100 * ev['miou']:.1f} %",
        ev["frames"],
    )
    return _summary_rows(run.path, "trained", time.perf_counter() - t0)


def _summary_rows(path: Path, status_: str, seconds: float) -> list[dict]:
    ev = read_json(path / "eval.json") or {}
    rows = read_csv(path / "metrics.csv")
    last = [float(r["loss"]) for r in rows[-10:]]
    miou, acc = ev.get("miou"), ev.get("pixel_accuracy")
    corpus = ((read_json(path / "run.json") or {}).get("config") or {}).get("fit2d", {}).get("datasets") or []
    return [
        {
            "dataset": ",".join(e["name"] for e in corpus),
            "status": status_,
            "steps": len(rows),
            "final_loss": round(float(np.mean(last)), 4) if last else None,
            "heldout_miou_2d": None if miou is None else round(100 * miou, 2),
            "heldout_pixel_acc": None if acc is None else round(100 * acc, 2),
            "heldout_frames": ev.get("frames"),
            "seconds": round(seconds, 1),
            "run_dir": str(path),
        }
    ]


def run(cfg: dict) -> list[dict]:
    """Run the fit2d stage: one summary row."""
    with run_lock(get_workdir(cfg), "fit2d", run_dir(cfg)):
        return train(cfg)


__all__ = ["run", "train", "status", "run_dir", "open_sources", "check_disjoint", "scene_keys", "MODEL_KIND"]
