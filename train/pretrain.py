"""Stage ``pretrain``: a sparse 3D U-Net learns from the cached 2D teacher, through the lifted
points. The caches are the only input: no 2D network runs here.

Methods (``pretrain.method``):

- ``ppnce`` (PPKT): per step n_sub voxel-pixel pairs are drawn across the batch; the 3D
  embedding f_i = ProjectionHead3D(F3D(voxel_i)) and the pixel embedding g_i = UPL(teacher
  features of the voxel's frame) at its pixel give the InfoNCE loss
  L = -(1/n) sum_i log(exp(f_i.g_i / tau) / sum_j exp(f_i.g_j / tau))  (losses.ppnce).
- ``soft_ce`` (Data-Efficient 3D Learner): SegHead logits s_i against the renormalised top-k
  soft labels t_i of the teacher cell covering the voxel's pixel,
  L = -(1/n) sum_i sum_c t_ic log softmax(s_i)_c  (losses.soft_ce).
- ``ppkd`` (PPKT's distillation baseline): L = tau^2 (1/n) sum_i KL(p_i || softmax(s_i / tau))
  with the teacher's (renormalised top-k) probabilities p_i  (losses.ppkd).

The run folder follows :mod:`lift3d.train.runs` (``runs/pretrain/<method>-<identity>/``:
``checkpoint.pt``, ``model.pt``, ``metrics.csv``, ``loss.png``, ``run.json``). Under torchrun
every process trains its slice of each batch (:mod:`lift3d.train.ddp`); rank 0 writes.
TensorBoard scalars go to ``tb/`` where it is installed (:mod:`lift3d.train.tensorboard`).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import zarr

from lift3d.core.config import sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.device import resolve_device
from lift3d.core.errors import StoreError
from lift3d.core.graph import upstream_lineages as graph_upstream
from lift3d.core.graph import upstream_problems
from lift3d.core.progress import bar as progress_bar
from lift3d.nets.heads import UPL, ProjectionHead3D, SegHead
from lift3d.nets.sparse import build_model, check_backend
from lift3d.nets.sparse import sparse_input as sparse_tensor
from lift3d.train import ddp
from lift3d.train.data import METHODS, loader, open_sources
from lift3d.train.losses import ppkd, ppnce, soft_ce, topk_to_dense
from lift3d.train.optim import lr_at, make_optimizer
from lift3d.train.runs import Run, rows_before, run_lock, run_status
from lift3d.train.tensorboard import TensorBoard

log = logging.getLogger("lift3d")

# keys that do not change what is learned (left out of the run's identity)
BOOKKEEPING = ("num_workers", "checkpoint_every", "run_name", "log_every", "backend", "device")
METRICS = ["step", "loss", "floor", "lr", "time"]  # floor: chance (ppnce) or the targets' entropy
init_distributed = ddp.init_distributed


# ----------------------------------------------------------------------------- identity


def identity(cfg: dict) -> dict:
    p = {k: v for k, v in cfg["pretrain"].items() if k not in BOOKKEEPING}
    if not cfg["teacher"].get("flip_pass") and isinstance(p.get("augment"), dict):
        # without a teacher flip pass flip_2d cannot act: runs keep the identity they had before it
        p["augment"] = {k: v for k, v in p["augment"].items() if k != "flip_2d"}
    if p.get("control") is None:
        p.pop("control", None)  # no control (the default): runs keep the identity they had before the key
    if p.get("schedule") != "exponential":
        p.pop("gamma", None)  # only the exponential schedule reads it
    if check_backend(p.get("sparse_backend"), "pretrain.sparse_backend") == "minkowski":
        p.pop("sparse_backend", None)  # the default backend: runs keep the identity they had before the key
    # the device enters as what it computes on (bf16 autocast on a GPU), not as it is spelled
    p["device"] = resolve_device(cfg["pretrain"].get("device"), "pretrain.device").type
    return {"pretrain": p, "datasets": cfg["datasets"], "teacher": cfg["teacher"]["name"]}


def run_dir(cfg: dict) -> Path:
    p = cfg["pretrain"]
    name = p.get("run_name") or f"{p['method']}-{sha256_json(identity(cfg))[:10]}"
    return get_workdir(cfg) / "runs" / "pretrain" / name


def upstream_lineages(cfg: dict) -> dict:
    """The lineage each cache group must have under the current configuration (stages.yaml's graph)."""
    return graph_upstream(cfg, "pretrain")


def status(cfg: dict) -> tuple[str, list[str]]:
    """done when the run folder of the current identity is complete and was trained on the
    current caches; otherwise out of date (or missing) with the reasons."""
    d = run_dir(cfg)
    where = f"runs/pretrain/{d.name}"
    reasons = upstream_problems(cfg, upstream_lineages(cfg))
    state, why, info = run_status(
        d, where, reasons, (upstream_lineages(cfg), "was trained on other caches (upstream changed)")
    )
    return (state, why) if state != "done" else ("done", [f"{where} complete ({info.get('steps')} steps)"])


# ----------------------------------------------------------------------------- the method


class Learner(torch.nn.Module):
    """The 3D network plus the method's heads (what the optimiser trains)."""

    def __init__(self, p: dict, teacher_channels: int, num_classes: int):
        super().__init__()
        self.method = p["method"]
        self.net = build_model(p["model"], 3, int(p["feature_dim"]), backend=check_backend(p.get("sparse_backend")))
        if self.method == "ppnce":
            self.head3d = ProjectionHead3D(int(p["feature_dim"]), int(p["proj_dim"]))
            self.upl = UPL(teacher_channels, int(p["proj_dim"]))
        else:
            if num_classes <= 0:
                raise StoreError("the teacher group lists no classes: soft labels need the attribute 'classes'")
            self.seg = SegHead(int(p["feature_dim"]), num_classes)
        self.num_classes = num_classes


CONTROLS = (None, "shuffled_pairs")


def shuffle_within_frames(frame: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A permutation ``perm`` of the rows that keeps each row in its frame (``frame[perm] == frame``)
    and is uniformly random within each frame: the pairing control reads ``pixel[perm]``, so every
    3D point meets a pixel of its own frame that it did not come from (barring chance)."""
    frame = frame.to(torch.long).cpu()
    keys = frame.to(torch.float64) + torch.rand(len(frame), generator=gen, dtype=torch.float64) * 0.5
    shuffled = torch.argsort(keys)  # grouped by frame, random order inside each group
    ordered = torch.argsort(frame, stable=True)  # grouped by frame, original order inside
    perm = torch.empty_like(ordered)
    perm[ordered] = shuffled
    return perm


def drop_ignored(logits: torch.Tensor, target: torch.Tensor, ignore: int | None) -> tuple:
    """Leave a folded teacher's "other" class out of dense soft targets: its column is zeroed,
    each row renormalised over the rest, and rows with no mass left (all "other") dropped."""
    if ignore is None:
        return logits, target
    target = target.clone()
    target[:, int(ignore)] = 0.0
    mass = target.sum(1, keepdim=True)
    keep = mass[:, 0] > 1e-6
    return logits[keep], target[keep] / mass[keep]


def sparse_input(batch: dict, device: torch.device, backend: str = "minkowski"):
    return sparse_tensor(batch["feats"].to(device), batch["coords"].to(device), backend)


def compute_loss(
    learner: Learner, batch: dict, p: dict, device: torch.device, step: int, amp: bool = False
) -> torch.Tensor:
    """The method's loss on one collated batch (see the module docstring)."""
    out = learner.net(sparse_input(batch, device, learner.net.backend))
    feats = out.F  # rows in the order of batch["coords"] (one per input voxel)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with ctx:
        if learner.method == "ppnce":
            m = feats.shape[0]
            n = min(int(p["n_sub"]), m)
            gen = torch.Generator().manual_seed(int(p["seed"]) * 1_000_003 + int(step))
            sel = torch.randperm(m, generator=gen)[:n]
            z3d = learner.head3d(feats[sel.to(device)])
            frame, pix = batch["frame"][sel], batch["pixel"][sel]
            if p.get("control") == "shuffled_pairs":  # each point paired with another pixel of its frame
                pix = pix[shuffle_within_frames(frame, gen)]
            z2d = torch.empty_like(z3d)
            # one UPL.sample per (map shape, image size) group of frames in the batch
            keys = [(tuple(f.shape), tuple(hw)) for f, hw in zip(batch["features"], batch["image_hw"])]
            for key in sorted(set(keys)):
                members = [i for i, k in enumerate(keys) if k == key]
                maps = torch.stack([batch["features"][i] for i in members]).to(device)
                remap = torch.full((len(keys),), -1, dtype=torch.long)
                remap[members] = torch.arange(len(members))
                rows = remap[frame] >= 0
                if rows.any():
                    z2d[rows.to(device)] = learner.upl.sample(
                        maps, remap[frame[rows]].to(device), pix[rows].to(device), key[1]
                    ).to(z2d.dtype)
            loss = ppnce(z3d.float(), z2d.float(), float(p["temperature"]))
            learner.floor = math.log(n)  # chance: embeddings that match nothing
        else:
            logits = learner.seg(feats).float()
            target = topk_to_dense(batch["prob"].to(device), batch["index_k"].to(device), learner.num_classes)
            if p.get("control") == "shuffled_pairs":  # each voxel takes another voxel's target in its frame
                gen = torch.Generator().manual_seed(int(p["seed"]) * 1_000_003 + int(step))
                target = target[shuffle_within_frames(batch["frame"], gen).to(device)]
            logits, target = drop_ignored(logits, target, getattr(learner, "ignore_class", None))
            learner.floor = float(-(torch.xlogy(target, target)).sum(1).mean()) if len(target) else 0.0
            if learner.method == "soft_ce":
                loss = soft_ce(logits, target)  # >= the targets' entropy, learner.floor
            else:
                loss = ppkd(logits, target, float(p.get("kd_temperature", 1.0)), teacher_is_prob=True)
    return loss


def build(cfg: dict, sources) -> tuple[Learner, torch.optim.Optimizer]:
    p = cfg["pretrain"]
    if p["method"] not in METHODS:
        raise ValueError(f"pretrain.method must be one of {METHODS}, got {p['method']!r}")
    if p.get("control") not in CONTROLS:
        raise ValueError(f"pretrain.control must be null or shuffled_pairs, got {p['control']!r}")
    channels, classes = set(), set()
    for s in sources:
        te = zarr.open_group(s.teacher_path, mode="r")
        channels.add(int(te["features"].shape[1]))
        classes.add((s.classes, s.ignore_class))
    if len(channels) > 1 or len(classes) > 1:
        raise StoreError(f"datasets disagree on the teacher's channels {channels} / classes {classes}")
    torch.manual_seed(int(p["seed"]))
    n_classes, ignore = classes.pop()
    learner = Learner(p, channels.pop(), n_classes)
    learner.ignore_class = ignore
    return learner, make_optimizer(p, learner.parameters())


def wrap_ddp(learner: Learner, p: dict, device: torch.device, amp: bool):
    """The learner's loss inside DistributedDataParallel (gradients averaged over the ranks)."""
    return ddp.wrap_ddp(learner, lambda m, batch, step: compute_loss(m, batch, p, device, step, amp))


# ----------------------------------------------------------------------------- the loop


def train(cfg: dict, stop_at: int | None = None) -> dict:
    """Train (or resume) the run of the current configuration. ``stop_at`` ends the process
    after that many total steps without completing the run (tests use it as a 'kill').
    Inside a data-parallel group every rank calls this; rank 0 alone writes the run folder."""
    p = cfg["pretrain"]
    rank = ddp.dist_info()
    sources = open_sources(cfg)  # refuses missing / incomplete / stale caches
    run = Run("pretrain", run_dir(cfg), sha256_json(identity(cfg)), upstream_lineages(cfg))
    done = run.is_done()
    ddp.barrier(rank)  # every rank has read run.json before rank 0 changes the folder
    if done:
        if rank.main:
            log.info("pretrain: %s is complete and up to date, nothing to do", run.path)
        return _summary(p, rows_before(run.metrics_path, 1 << 62), run.path, 0.0, 0, "up to date")
    if rank.main:
        run.prepare("was trained on other caches or settings")
    ddp.barrier(rank)

    device = resolve_device(p.get("device"), "pretrain.device")
    if rank.world > 1 and device.type == "cuda":
        device = torch.device("cuda", rank.local_rank)  # one process per GPU
        torch.cuda.set_device(device)
    amp = bool(p.get("amp", True)) and device.type == "cuda"
    np.random.seed(int(p["seed"]) % (2**32))
    learner, opt = build(cfg, sources)
    learner.to(device)
    total = int(p["iterations"])
    start = _resume(run, learner, opt, rank)
    rows = rows_before(run.metrics_path, start)
    ddp.barrier(rank)  # every rank has read the checkpoint and the metrics before rank 0 rewrites them

    base = {"config": cfg, "steps": total, **({"world_size": rank.world} if rank.world > 1 else {})}
    end = total if stop_at is None else min(total, int(stop_at))
    every = max(1, int(p.get("checkpoint_every", 50)))
    clip = float(p.get("grad_clip", 0.0))
    wrapped = wrap_ddp(learner, p, device, amp) if rank.world > 1 else None
    metrics = run.open_metrics(METRICS, rows) if rank.main else None
    if rank.main:
        run.mark(base, start)
    tb = TensorBoard(run.path, start, enabled=rank.main)
    learner.train()
    t0 = time.perf_counter()
    step = start
    bar = progress_bar(end - start, f"pretrain/{p['method']}", "step", mininterval=1.0, disable=not rank.main)
    try:
        for batch in (
            loader(cfg, sources, start=start, stop=end, rank=rank.rank, world=rank.world) if start < end else ()
        ):
            step = int(batch["step"])
            lr = lr_at(p, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if wrapped is None:
                loss = compute_loss(learner, batch, p, device, step, amp)
                value = loss.item()
            else:  # this rank's slice; DDP averages the gradients in backward
                loss = wrapped(batch, step)
                value = ddp.mean_over_ranks(loss, rank)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"pretrain: loss is {value} at step {step}"
                    + (" (mean over the ranks)" if wrapped is not None else "")
                )
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(learner.parameters(), clip)
            opt.step()
            row = {"step": step, "loss": f"{value:.6f}", "lr": f"{lr:.6g}", "time": f"{time.perf_counter() - t0:.3f}"}
            if getattr(learner, "floor", None) is not None:
                row["floor"] = f"{learner.floor:.6f}"
            rows.append(row)
            if rank.main:
                metrics.write(row)
                tb.add(row)
            bar.set_postfix(loss=row["loss"], lr=row["lr"], refresh=False)
            bar.update(1)
            step += 1
            if rank.main and (step % every == 0 or step == end):
                metrics.flush()
                state = {
                    "model": learner.net.state_dict(),
                    "backend": learner.net.backend,
                    "optimizer": opt.state_dict(),
                    "heads": {k: v for k, v in learner.state_dict().items() if not k.startswith("net.")},
                }
                run.save_checkpoint(step, {**state, **({"world_size": rank.world} if rank.world > 1 else {})})
                run.mark(base, step)
                tb.flush()
    finally:
        bar.close()
        tb.close()
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - t0
    if step < total:
        ddp.barrier(rank)  # the checkpoint is on disk before any rank returns
        return _summary(p, rows, run.path, seconds, step - start, "stopped")
    if rank.main:
        model = {
            "model": learner.net.state_dict(),
            "model_name": p["model"],
            "backend": learner.net.backend,
            "in_channels": 3,
            "out_channels": int(p["feature_dim"]),
            "method": p["method"],
            "steps": total,
        }
        run.finish(model, base, total, rows, f"pretrain {p['method']} ({p['model']})")
    ddp.barrier(rank)
    return _summary(p, rows, run.path, seconds, step - start, "trained")


def _resume(run: Run, learner: Learner, opt, rank: ddp.DistInfo) -> int:
    """The step to start from: the checkpoint's (weights, optimiser and RNGs restored), else 0."""
    state = run.load_checkpoint()
    if state is None:
        return 0
    learner.load_state_dict({**{f"net.{k}": v for k, v in state["model"].items()}, **state["heads"]})
    opt.load_state_dict(state["optimizer"])
    was = int(state.get("world_size", 1))
    if rank.world != was and rank.main:
        log.warning(
            "pretrain: %s was written by %d process(es), this run has %d: the batches stay the same, "
            "but batch-norm statistics and the augmentation draws depend on the process count, so "
            "from step %d on the result differs from an uninterrupted run",
            run.checkpoint_path,
            was,
            rank.world,
            int(state["step"]),
        )
    return int(state["step"])


def _summary(p: dict, rows: list[dict], d: Path, seconds: float, steps_now: int, status_: str) -> dict:
    last = [float(r["loss"]) for r in rows[-10:]]
    floors = [float(r["floor"]) for r in rows[-10:] if r.get("floor")]
    return {
        "method": p["method"],
        "status": status_,
        "steps": len(rows),
        "final_loss": round(float(np.mean(last)), 4) if last else None,
        # ppnce: chance, ln(pairs); soft_ce / ppkd: the targets' entropy (soft_ce cannot go below it)
        "final_floor": round(float(np.mean(floors)), 4) if floors else None,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps_now / seconds, 3) if seconds > 0 else 0.0,
        "run_dir": str(d),
    }


def run(cfg: dict) -> list[dict]:
    """Run the pretrain stage; one summary row. One process per run folder. Under torchrun
    (WORLD_SIZE > 1) every process joins the data-parallel group first; rank 0 takes the lock
    and its verdict (or its refusal) reaches every rank."""
    created = ddp.init_distributed(cfg)
    try:
        with ExitStack() as stack:
            lock = run_lock(get_workdir(cfg), "pretrain", run_dir(cfg))
            ddp.rank0_decides(ddp.dist_info(), lambda: stack.enter_context(lock) and None)
            return [train(cfg)]
    finally:
        if created:
            tdist.destroy_process_group()


__all__ = [
    "run",
    "status",
    "train",
    "run_dir",
    "identity",
    "compute_loss",
    "Learner",
    "build",
    "upstream_lineages",
    "init_distributed",
    "wrap_ddp",
]
