"""distill2d, part 3: the baseline and the distilled 2D network, trained in turn, and their evaluation."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lift3d.core import checkpoint as ckpt
from lift3d.core.classmaps import scannet20_names
from lift3d.core.config import resolve_path, sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.errors import DistillError
from lift3d.core.graph import groups, upstream_problems
from lift3d.core.metrics import confusion_with_none as confusion
from lift3d.core.metrics import pixel_scores as scores
from lift3d.core.store import StoreError
from lift3d.nets import backbones2d as backbones
from lift3d.nets.backbones2d import sha256_path
from lift3d.nets.pspnet import Discriminators, Seg2D, gan_losses, masked_l2, sample_pixels, set_requires_grad
from lift3d.pipeline.readers.base import Frame, make_reader
from lift3d.pipeline.readers.common import to_grid
from lift3d.pipeline.readers.scannet_labels import IGNORE_INDEX, default_labels
from lift3d.train import finetune
from lift3d.train.distill2d.cache import NUM_CLASSES, Source, _device, build_cache, open_sources, resolve_checkpoint
from lift3d.train.distill2d.data import TrainData
from lift3d.train.runs import Run, read_csv, read_json, rows_before, run_lock, run_status, save_json, save_torch

log = logging.getLogger("lift3d")

BOOKKEEPING = ("checkpoint_every", "run_name", "device")
PHASES = ("baseline", "distilled")


# ----------------------------------------------------------------------------- model building


def make_backbone(d: dict):
    if d["backbone"] == "efficientnet_lite0":
        return backbones.efficientnet_lite0(weights_path=d.get("backbone_weights"))
    if d["backbone"] == "resnet50":
        return backbones.resnet50(d.get("backbone_weights"))
    raise DistillError(f"distill2d.backbone must be efficientnet_lite0 or resnet50, got {d['backbone']!r}")


def build_net(d: dict, distilled: bool, channels_3d: int | None = None, mean_3d=None, std_3d=None) -> Seg2D:
    torch.manual_seed(int(d["seed"]))
    bb = make_backbone(d)
    ts = int(d["backbone_train_stages"])
    ts = None if ts < 0 else ts
    if not distilled:
        return Seg2D(bb, NUM_CLASSES, int(d["head_dim"]), train_stages=ts)
    return Seg2D(bb, NUM_CLASSES, int(d["head_dim"]), channels_3d, mean_3d, std_3d, train_stages=ts)


def make_optimizer(d: dict, net: Seg2D) -> torch.optim.Optimizer:
    """SGD with momentum; the new layers at ``head_lr_mult`` times the backbone's rate (PSPNet: 10)."""
    head = net.head_parameters()
    ids = {id(p) for p in head}
    trunk = [p for p in net.parameters() if id(p) not in ids and p.requires_grad]
    lr = float(d["lr"])
    return torch.optim.SGD(
        [
            {"params": trunk, "lr": lr, "mult": 1.0},
            {"params": head, "lr": lr * float(d["head_lr_mult"]), "mult": float(d["head_lr_mult"])},
        ],
        lr=lr,
        momentum=float(d["momentum"]),
        weight_decay=float(d["weight_decay"]),
    )


def poly_lr(d: dict, step: int) -> float:
    total = max(1, int(d["iterations"]))
    return float(d["lr"]) * (1.0 - min(step, total) / total) ** 0.9


# ----------------------------------------------------------------------------- one step


def generator_step(
    net: Seg2D, disc: Discriminators | None, opt, batch: dict, d: dict, hw, fake_rng=None, real: dict | None = None
) -> tuple[dict, dict]:
    """One update of the 2D network (the discriminators frozen). Returns (loss parts, fake features
    by category for the discriminator step; detached)."""
    if disc is not None:
        set_requires_grad(disc, False)
    opt.zero_grad(set_to_none=True)
    out = net(batch["rgb"])
    logits = F.interpolate(out["logits"], size=tuple(hw), mode="bilinear", align_corners=False)
    if bool((batch["labels"] != IGNORE_INDEX).any()):
        seg = F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)
    else:  # no labelled pixel in the batch (frames without a label image): no segmentation signal
        seg = logits.sum() * 0.0
    parts = {"seg": seg}
    loss = float(d.get("loss_seg", 1.0)) * seg
    fake = {}
    if net.distilled:
        l2 = masked_l2(out["f3d_sim"], batch["pair_frame"], batch["pair_pixel"], batch["pair_feat"], hw)
        parts["l2"] = l2
        loss = loss + float(d["loss_l2"]) * l2
        if disc is not None and any(batch["unpaired"]):
            fake = fake_features(out["f3d_sim"], batch, int(d["disc_samples"]), hw, fake_rng)
            adv = gan_losses(disc, fake, real or {}, for_generator=True)
            parts["adv"] = adv
            loss = loss + float(d["loss_adv"]) * adv
    parts["loss"] = loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"distill2d: loss is {loss.item()}")
    loss.backward()
    opt.step()
    if disc is not None:
        set_requires_grad(disc, True)
    return {k: float(v.detach()) for k, v in parts.items()}, {c: f.detach() for c, f in fake.items()}


def discriminator_step(disc: Discriminators, opt_d, fake: dict, real: dict) -> float:
    """One update of the per-category discriminators on detached simulated (fake) and real 3D features."""
    opt_d.zero_grad(set_to_none=True)
    loss = gan_losses(disc, fake, real, for_generator=False)
    loss.backward()
    opt_d.step()
    return float(loss.detach())


def fake_features(f3d_sim: torch.Tensor, batch: dict, per_class: int, hw, rng) -> dict[int, torch.Tensor]:
    """Simulated 3D features of the unpaired frames at up to ``per_class`` pixels per 2D category."""
    labels = batch["labels"]
    out = {}
    frames = [j for j, u in enumerate(batch["unpaired"]) if u]
    lab = labels[frames]  # (U, H, W)
    for c in torch.unique(lab).tolist():
        if c >= NUM_CLASSES:
            continue
        where = torch.nonzero(lab == c)  # (n, 3): u, row, col
        pick = torch.from_numpy(rng.choice(len(where), size=min(per_class, len(where)), replace=False))
        w = where[pick]
        fidx = torch.tensor(frames, dtype=torch.long)[w[:, 0]]
        out[int(c)] = sample_pixels(f3d_sim, fidx, w[:, 1:], hw)
    return out


# ----------------------------------------------------------------------------- identity and status


def identity(cfg: dict) -> dict:
    """The settings plus the 3D network distilled: the fine-tuning run's identity when
    ``distill2d.checkpoint`` is null, else the file's sha256 (so two checkpoints never share a run)."""
    d = {k: v for k, v in cfg["distill2d"].items() if k not in BOOKKEEPING}
    ck = d.get("checkpoint")
    if ck is None:
        source = {"finetune": sha256_json(finetune.identity(cfg))}
    else:
        path = resolve_path(cfg, ck)
        path = path / "model.pt" if path.is_dir() else path
        source = {"file": sha256_path(path) if path.is_file() else f"missing:{path}"}
    return {"distill2d": d, "datasets": cfg["datasets"], "checkpoint_3d": source}


def run_dir(cfg: dict) -> Path:
    d = cfg["distill2d"]
    name = d.get("run_name") or f"{d['backbone']}-{sha256_json(identity(cfg))[:10]}"
    return get_workdir(cfg) / "runs" / "distill2d" / name


def upstream(cfg: dict, ck_path: Path) -> dict:
    out = {f"frames.zarr/{g.path}": g.lineage_sha256 for g in groups(cfg, "frames")}
    out["checkpoint_sha256"] = sha256_path(ck_path)
    return out


def status(cfg: dict) -> tuple[str, list[str]]:
    d = run_dir(cfg)
    where = f"runs/distill2d/{d.name}"
    try:
        ck = resolve_checkpoint(cfg)
    except (StoreError, FileNotFoundError) as exc:
        return ("missing" if not d.exists() else "out of date"), [str(exc)]
    up = upstream(cfg, ck)
    reasons = upstream_problems(cfg, {k: v for k, v in up.items() if k != "checkpoint_sha256"})
    state, why, _ = run_status(
        d, where, reasons, (upstream(cfg, ck), "was made from another 3D checkpoint or other frames")
    )
    if state != "done":
        return state, why
    ev = read_json(d / "eval.json") or {}
    return "done", [f"{where} complete: 2D mIoU baseline {_pct(ev, 'baseline')}, distilled {_pct(ev, 'distilled')}"]


def _pct(ev: dict, k: str) -> str:
    v = (ev.get(k) or {}).get("miou")
    return "n/a" if v is None else f"{100 * v:.1f} %"


def summary(cfg: dict) -> dict | None:
    """For the demo's verdict table: the finished run's eval.json figures, or None when not done.
    {"2D mIoU baseline", "2D mIoU distilled", "2D mIoU gain", "extra_inference_ms_per_frame", "run_dir"}."""
    ev = read_json(run_dir(cfg) / "eval.json")
    if not ev:
        return None
    b, t = ev["baseline"]["miou"], ev["distilled"]["miou"]
    return {
        "2D mIoU baseline": b,
        "2D mIoU distilled": t,
        "2D mIoU gain": None if b is None or t is None else t - b,
        "extra_inference_ms_per_frame": ev.get("extra_inference_ms_per_frame"),
        "run_dir": str(run_dir(cfg)),
    }


# ----------------------------------------------------------------------------- training

FIELDS = ["phase", "step", "loss", "seg", "l2", "adv", "disc", "lr", "time"]


def train_phase(
    cfg: dict,
    phase: str,
    data: TrainData,
    run: Run,
    stats=None,
    stop_at: int | None = None,
    section: str = "distill2d",
) -> tuple[Seg2D | None, list[dict]]:
    """Train (or resume) one network of the ``section`` stage (distill2d; fit2d trains its
    teacher as a baseline network). Returns (the network, or None when stopped early; its rows)."""
    d = cfg[section]
    distilled = phase == "distilled"
    total = int(d["iterations"])
    hw = data.hw
    if distilled:
        net = build_net(d, True, data.caches[0].channels, stats[0], stats[1])
    else:
        net = build_net(d, False)
    opt = make_optimizer(d, net)
    adversarial = distilled and bool(data.unpaired.any())
    disc = opt_d = None
    if adversarial:
        torch.manual_seed(int(d["seed"]) + 1)
        disc = Discriminators(net.channels_3d, NUM_CLASSES, int(d["disc_hidden"]))
        opt_d = torch.optim.Adam(disc.parameters(), lr=float(d["disc_lr"]), betas=(0.5, 0.999))
    start = 0
    st = run.load_checkpoint(phase=phase)
    if st is not None:
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        if disc is not None:
            disc.load_state_dict(st["disc"])
            opt_d.load_state_dict(st["optimizer_d"])
        start = int(st["step"])
    rows = rows_before(run.metrics_path, start, phase=phase)
    others = [r for r in read_csv(run.metrics_path) if r["phase"] != phase]
    end = total if stop_at is None else min(total, stop_at)
    every = max(1, int(d["checkpoint_every"]))
    device = _device(d)
    net.to(device)
    if disc is not None:
        disc.to(device)
    net.train()
    t0 = time.perf_counter()
    metrics = run.open_metrics(FIELDS, others + rows)
    base = {"config": cfg, "steps": total}
    try:
        for step in range(start, end):
            lr = poly_lr(d, step)
            for g in opt.param_groups:
                g["lr"] = lr * g["mult"]
            batch = data.batch(step, distilled)
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            real = (
                {c: f.to(device) for c, f in data.real_bank(step, int(d["disc_samples"])).items()}
                if adversarial
                else None
            )
            parts, fake = generator_step(
                net, disc, opt, batch, d, hw, np.random.default_rng([int(d["seed"]), step, 0xFA4E]), real
            )
            dl = discriminator_step(disc, opt_d, fake, real) if adversarial and fake else None
            row = {
                "phase": phase,
                "step": step,
                "loss": f"{parts['loss']:.6f}",
                "seg": f"{parts['seg']:.6f}",
                "l2": f"{parts['l2']:.6f}" if "l2" in parts else "",
                "adv": f"{parts['adv']:.6f}" if "adv" in parts else "",
                "disc": f"{dl:.6f}" if dl is not None else "",
                "lr": f"{lr:.6g}",
                "time": f"{time.perf_counter() - t0:.3f}",
            }
            rows.append(row)
            metrics.write(row)
            done = step + 1
            if done % every == 0 or done == end:
                metrics.flush()
                state = {"phase": phase, "model": net.state_dict(), "optimizer": opt.state_dict()}
                if disc is not None:
                    state.update(disc=disc.state_dict(), optimizer_d=opt_d.state_dict())
                run.save_checkpoint(done, state)
                run.mark(base, done, phase=phase)
            if step % 20 == 0:
                log.info("%s %s step %d/%d loss %s", section, phase, step, total, rows[-1]["loss"])
    finally:
        metrics.close()
    if end < total:
        return None, rows
    return net.to("cpu").eval(), rows


def save_net(path: Path, net: Seg2D, d: dict, extra: dict) -> None:
    obj = {
        "model": net.state_dict(),
        "backbone": d["backbone"],
        "num_classes": NUM_CLASSES,
        "head_dim": int(d["head_dim"]),
        "distilled": net.distilled,
        "channels_3d": getattr(net, "channels_3d", None),
        "classes": scannet20_names(),
        **extra,
    }
    save_torch(path, obj)


def load_net(path: Path, d: dict) -> Seg2D:
    obj = ckpt.load(path, "a distill2d 2D network", error=DistillError)
    if obj["distilled"]:
        c = obj["channels_3d"]
        net = build_net(d, True, c, torch.zeros(c), torch.ones(c))
    else:
        net = build_net(d, False)
    net.load_state_dict(obj["model"])
    return net.eval()


# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg: dict, sources: list[Source], nets: dict[str, Seg2D]) -> dict:
    """2D mIoU (ScanNet-20) of each network on the frames of the evaluation split, read with the
    dataset's reader, against the 2D label images; and each network's CPU/GPU time per frame."""
    d = cfg["distill2d"]
    wd = get_workdir(cfg)
    names = scannet20_names()
    conf = {k: np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64) for k in nets}
    times = {k: [] for k in nets}
    n_frames = 0
    device = _device(d)
    for net in nets.values():
        net.to(device).eval()
    for src in sources:
        entry = {**src.entry, "split": d["eval_split"]}
        reader = make_reader(entry, wd)
        reader.prepare()
        labels = default_labels(entry, wd)
        if labels is None:
            raise DistillError(f"dataset {entry['name']}: no 2D label images under {reader.root}/scans")
        try:
            for scene in reader.scenes():
                for fr in reader.frames(scene, int(entry.get("frame_skip") or 1)):
                    if not isinstance(fr, Frame):
                        continue
                    gt = labels(scene, fr.source_index)
                    if gt is None:
                        continue
                    H, W = fr.rgb.shape[:2]
                    gt = to_grid(np.asarray(gt), H, W).astype(np.int64)
                    x = torch.from_numpy(np.ascontiguousarray(fr.rgb)).permute(2, 0, 1)[None].float().to(device)
                    for k, net in nets.items():
                        with torch.no_grad():
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            t = time.perf_counter()
                            logits = net(x)["logits"]
                            pred = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False).argmax(1)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            times[k].append(time.perf_counter() - t)
                        conf[k] += confusion(gt, pred[0].cpu().numpy())
                    n_frames += 1
        finally:
            labels.close()
    if n_frames == 0:
        raise DistillError(f"distill2d: no labelled frames in split {d['eval_split']!r} to evaluate on")
    out = {}
    for k in nets:
        res = scores(conf[k], names)
        t = times[k][1:] or times[k]  # the first call warms up
        out[k] = {
            **res,
            "ms_per_frame": 1000 * float(np.median(t)),
            "frames": n_frames,
            "parameters": int(sum(p.numel() for p in nets[k].parameters())),
        }
    return out


# ----------------------------------------------------------------------------- the stage


def train(cfg: dict, stop_at: int | None = None) -> list[dict]:
    """Run (or resume) the stage. ``stop_at`` ends after that many steps of the current phase
    without completing the run (the tests' 'kill')."""
    d = cfg["distill2d"]
    if int(d["batch_size"]) < 2:
        raise DistillError("distill2d.batch_size must be >= 2 (batch statistics in the pyramid pooling and DN)")
    if not 0.0 <= float(d["unpaired_fraction"]) < 1.0:
        raise DistillError(f"distill2d.unpaired_fraction must be in [0, 1), got {d['unpaired_fraction']}")
    sources = open_sources(cfg)
    ck_path = resolve_checkpoint(cfg)
    run = Run("distill2d", run_dir(cfg), sha256_json(identity(cfg)), upstream(cfg, ck_path))
    if run.is_done():
        log.info("distill2d: %s is complete and up to date, nothing to do", run.path)
        return _summary_rows(run.path, "up to date", 0.0)
    run.prepare("was made from another 3D checkpoint or other frames")
    t0 = time.perf_counter()
    caches = build_cache(cfg, sources, ck_path)
    base = {"config": cfg, "steps": int(d["iterations"])}
    run.mark(base, 0, phase="baseline")
    data = TrainData(cfg, sources, caches)
    nets = {}
    for phase in PHASES:
        path = run.path / ("baseline.pt" if phase == "baseline" else "model.pt")
        if path.exists():
            nets[phase] = load_net(path, d)
            continue
        stats = None
        if phase == "distilled":
            paired = [data.items[k] for k in np.flatnonzero(~data.unpaired)]
            mean, std, n = _stats(data, paired)
            stats = (mean, std)
        net, _ = train_phase(cfg, phase, data, run, stats, stop_at)
        if net is None:
            return _summary_rows(run.path, "stopped", time.perf_counter() - t0)
        extra = {"steps": int(d["iterations"])}
        if phase == "distilled":
            extra.update(mean_3d=stats[0].tolist(), std_3d=stats[1].tolist(), checkpoint_3d=str(ck_path))
        save_net(path, net, d, extra)
        nets[phase] = net
    res = evaluate(cfg, sources, nets)
    ev = {
        **res,
        "extra_inference_ms_per_frame": res["distilled"]["ms_per_frame"] - res["baseline"]["ms_per_frame"],
        "miou_gain": (
            None
            if res["baseline"]["miou"] is None or res["distilled"]["miou"] is None
            else res["distilled"]["miou"] - res["baseline"]["miou"]
        ),
        "eval_split": d["eval_split"],
        "datasets": ",".join(s.entry["name"] for s in sources),
        "device": str(_device(d)),
        "threads": torch.get_num_threads(),
        "train_frames": len(data),
        "unpaired_frames": int(data.unpaired.sum()),
        "checkpoint_3d": str(ck_path),
    }
    save_json(run.path / "eval.json", ev)
    run.finish(None, base, int(d["iterations"]), phase="distilled")
    run.checkpoint_path.unlink(missing_ok=True)
    return _summary_rows(run.path, "trained", time.perf_counter() - t0)


def _stats(data: TrainData, items) -> tuple[np.ndarray, np.ndarray, int]:
    s = np.zeros(data.caches[0].channels)
    s2 = np.zeros_like(s)
    n = 0
    for si, row in items:
        f = data.caches[si].frame(row)[0].astype(np.float64)
        s += f.sum(0)
        s2 += (f * f).sum(0)
        n += len(f)
    if n == 0:
        raise DistillError(
            "distill2d: no covered pixel in any paired training frame (the 3D points do not project "
            "into the frames: check poses, intrinsics and distill2d.depth_tolerance)"
        )
    mean = s / n
    return mean, np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12)), n


def _summary_rows(run: Path, status_: str, seconds: float) -> list[dict]:
    ev = read_json(run / "eval.json") or {}
    rows = read_csv(run / "metrics.csv")
    out = []
    for phase in PHASES:
        r = [x for x in rows if x["phase"] == phase]
        last = [float(x["loss"]) for x in r[-10:]]
        e = ev.get(phase) or {}
        out.append(
            {
                "dataset": ev.get("datasets", ""),
                "network": phase,
                "status": status_,
                "steps": len(r),
                "final_loss": round(float(np.mean(last)), 4) if last else None,
                "miou_2d": None if e.get("miou") is None else round(100 * e["miou"], 2),
                "pixel_acc": None if e.get("pixel_accuracy") is None else round(100 * e["pixel_accuracy"], 2),
                "ms_per_frame": None if e.get("ms_per_frame") is None else round(e["ms_per_frame"], 2),
                "seconds": round(seconds, 1),
                "run_dir": str(run),
            }
        )
    return out


def run(cfg: dict) -> list[dict]:
    """Run the distill2d stage: one summary row for the baseline, one for the distilled network."""
    with run_lock(get_workdir(cfg), "distill2d", run_dir(cfg)):
        return train(cfg)
