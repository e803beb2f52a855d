"""Stage ``pretrain``: a sparse 3D U-Net learns from the cached 2D teacher, through the lifted
points. The caches are the only input: no 2D network runs here.

Methods (``pretrain.method``):

- ``ppnce`` (PPKT): per step n_sub voxel-pixel pairs are drawn across the batch; the 3D
  embedding f_i = ProjectionHead3D(F3D(voxel_i)) and the pixel embedding g_i = UPL(teacher
  features of the voxel's frame) at its pixel give the InfoNCE loss
  L = -(1/n) sum_i log(exp(f_i.g_i / tau) / sum_j exp(f_i.g_j / tau))  (train.losses.ppnce).
- ``soft_ce`` (Data-Efficient 3D Learner): SegHead logits s_i against the renormalised top-k
  soft labels t_i of the teacher cell covering the voxel's pixel,
  L = -(1/n) sum_i sum_c t_ic log softmax(s_i)_c  (train.losses.soft_ce).
- ``ppkd`` (PPKT's distillation baseline): L = tau^2 (1/n) sum_i KL(p_i || softmax(s_i / tau))
  with the teacher's (renormalised top-k) probabilities p_i  (train.losses.ppkd).

Runs go to ``<workdir>/runs/pretrain/<run_name>/`` (default name: method + 10 hex digits of the
run's identity, the pretrain section minus bookkeeping keys plus the datasets and the teacher
name): ``checkpoint.pt`` (latest, atomic), ``model.pt`` (final 3D network), ``metrics.csv``,
``loss.png`` and ``run.json`` (config, upstream lineages, ``complete``). A killed run resumes
from its checkpoint and ends with the same weights as an uninterrupted one (CPU).

Data-parallel training (``torchrun --nproc_per_node=N -m lift3d.cli run pretrain``): when the
environment names more than one process (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT, as
torchrun sets them), every process joins a ``torch.distributed`` group (``pretrain.backend``:
auto = nccl on CUDA, gloo on the CPU), takes its slice of every batch (train.data: global batch
b is the same ``batch_size`` frames for any process count, rank r reads B / W of them) and runs
the method's loss in a DistributedDataParallel wrapper, which averages the gradients over the
ranks before clipping and the optimiser step, so every rank holds the same weights. Rank 0 alone
takes the run's lock and writes ``checkpoint.pt``, ``metrics.csv`` (the loss logged is the mean
over the ranks), ``tb/``, ``model.pt``, ``loss.png`` and ``run.json`` (with ``world_size``); every
rank resumes from the same checkpoint. The process count is not part of the run's identity;
a resume with another count continues from the checkpoint with a warning that the rest of the
run differs from an uninterrupted one. MinkowskiEngine's batch norm is not synchronised (ME has
no SyncBN on the CPU): each rank normalises with the statistics of its own B / W frames, and the
running statistics saved are rank 0's (DDP broadcasts rank 0's buffers before every forward).
For ``ppnce`` each rank draws ``n_sub`` pairs and its InfoNCE negatives come from its own frames.

TensorBoard: when ``torch.utils.tensorboard`` imports, rank 0 also writes the scalars of
metrics.csv (loss, lr) to ``<run dir>/tb/``; otherwise one log line says it is off. metrics.csv
stays the record (resume and the summary read it).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lift3d.config import sha256_json, workdir as get_workdir
from lift3d.progress import bar as progress_bar
from lift3d.stages import groups
from lift3d.store import StoreError, group_state, stage_lock, writing
from train.data import METHODS, loader, open_sources
from train.heads import UPL, ProjectionHead3D, SegHead
from train.losses import ppkd, ppnce, soft_ce, topk_to_dense
from train.models import build_model

log = logging.getLogger("lift3d")

# keys that do not change what is learned (left out of the run's identity)
BOOKKEEPING = ("num_workers", "checkpoint_every", "run_name", "log_every", "backend")


# ----------------------------------------------------------------------------- identity

def identity(cfg: dict) -> dict:
    p = {k: v for k, v in cfg["pretrain"].items() if k not in BOOKKEEPING}
    if not cfg["teacher"].get("flip_pass") and isinstance(p.get("augment"), dict):
        # without a teacher flip pass flip_2d cannot act: runs keep the identity they had before it
        p["augment"] = {k: v for k, v in p["augment"].items() if k != "flip_2d"}
    return {"pretrain": p, "datasets": cfg["datasets"], "teacher": cfg["teacher"]["name"]}


def run_dir(cfg: dict) -> Path:
    p = cfg["pretrain"]
    name = p.get("run_name") or f"{p['method']}-{sha256_json(identity(cfg))[:10]}"
    return get_workdir(cfg) / "runs" / "pretrain" / name


def upstream_lineages(cfg: dict) -> dict:
    """The lineage each upstream group must have under the current configuration."""
    out = {}
    for stage in ("frames", "teacher", "points"):
        for g in groups(cfg, stage):
            out[f"{g.store}.zarr/{g.path}"] = g.lineage_sha256
    return out


def status(cfg: dict) -> tuple[str, list[str]]:
    """done when the run folder of the current identity is complete and was trained on the
    current caches; otherwise out of date (or missing) with the reasons."""
    wd, d = get_workdir(cfg), run_dir(cfg)
    where = f"runs/pretrain/{d.name}"
    reasons = []
    for key, lin in upstream_lineages(cfg).items():
        store, path = key.split(".zarr/", 1)
        attrs = group_state(wd, store, path)
        if attrs is None or not attrs.get("complete"):
            reasons.append(f"{key} is missing or incomplete: run 'lift3d run {store}'")
        elif attrs.get("lineage_sha256") != lin:
            reasons.append(f"{key} is out of date: run 'lift3d run {store}'")
    state, why, info = run_status(d, where, reasons,
                                  (upstream_lineages(cfg), "was trained on other caches (upstream changed)"))
    return (state, why) if state != "done" else ("done", [f"{where} complete ({info.get('steps')} steps)"])


def run_status(d: Path, where: str, reasons: list[str],
               upstream: tuple | None = None) -> tuple[str, list[str], dict | None]:
    """The state of run folder ``d`` (shown as ``where``) from its ``run.json``, shared by the
    trainer's stages: ``missing`` (never run), ``out of date`` (incomplete; made from other
    inputs than ``upstream`` = (the expected ``run.json`` "upstream", why not); or anything in
    ``reasons``), else ``done`` with no reasons. Returns (state, reasons, the run.json or None)."""
    info = _read_json(d / "run.json")
    if info is None:
        return ("missing" if not d.exists() else "out of date"), reasons + [f"{where} has not been run"], None
    if not info.get("complete"):
        phase = f"{info['phase']} " if info.get("phase") else ""
        return "out of date", reasons + [f"{where} is incomplete ({phase}step {info.get('step', '?')})"], info
    if upstream is not None and info.get("upstream") != upstream[0]:
        return "out of date", reasons + [f"{where} {upstream[1]}"], info
    if reasons:
        return "out of date", reasons, info
    return "done", [], info


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


RESUME = "the last checkpoint is kept: the re-run resumes from it"


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)``, then rename over ``path``. A failed write (disk full, no permission) is one
    StoreError naming ``path``; torch.save reports it as a RuntimeError whose context is the
    OSError (when it writes through a Python file object), so that one is unwrapped."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "write", RESUME):
        try:
            write(tmp)
        except RuntimeError as exc:
            if not isinstance(exc.__context__, OSError):
                raise
            tmp.unlink(missing_ok=True)
            raise exc.__context__ from None
        os.replace(tmp, path)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:  # a Python file object: its OSError reaches _write_atomic
        torch.save(obj, fh)


def _save_json(path: Path, obj) -> None:
    _write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1, sort_keys=True)))


# ----------------------------------------------------------------------------- model

def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Learner(torch.nn.Module):
    """The 3D network plus the method's heads (what the optimiser trains)."""

    def __init__(self, p: dict, teacher_channels: int, num_classes: int):
        super().__init__()
        self.method = p["method"]
        self.net = build_model(p["model"], 3, int(p["feature_dim"]))
        if self.method == "ppnce":
            self.head3d = ProjectionHead3D(int(p["feature_dim"]), int(p["proj_dim"]))
            self.upl = UPL(teacher_channels, int(p["proj_dim"]))
        else:
            if num_classes <= 0:
                raise StoreError("the teacher group lists no classes: soft labels need the attribute 'classes'")
            self.seg = SegHead(int(p["feature_dim"]), num_classes)
        self.num_classes = num_classes


def sparse_input(batch: dict, device: torch.device):
    import MinkowskiEngine as ME

    return ME.SparseTensor(batch["feats"].to(device), coordinates=batch["coords"].to(device))


def compute_loss(learner: Learner, batch: dict, p: dict, device: torch.device, step: int,
                 amp: bool = False) -> torch.Tensor:
    """The method's loss on one collated batch (see the module docstring)."""
    out = learner.net(sparse_input(batch, device))
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
                    z2d[rows.to(device)] = learner.upl.sample(maps, remap[frame[rows]].to(device),
                                                              pix[rows].to(device), key[1]).to(z2d.dtype)
            loss = ppnce(z3d.float(), z2d.float(), float(p["temperature"]))
        else:
            logits = learner.seg(feats).float()
            target = topk_to_dense(batch["prob"].to(device), batch["index_k"].to(device), learner.num_classes)
            if learner.method == "soft_ce":
                loss = soft_ce(logits, target)
            else:
                loss = ppkd(logits, target, float(p.get("kd_temperature", 1.0)), teacher_is_prob=True)
    return loss


def lr_at(p: dict, step: int) -> float:
    """Learning rate of ``step`` (0-based): cosine to 0, poly (power 0.9), or constant."""
    base, total = float(p["lr"]), max(1, int(p["iterations"]))
    t = min(step, total) / total
    sched = p.get("schedule", "cosine")
    if sched == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if sched == "poly":
        return base * (1.0 - t) ** 0.9
    if sched == "constant":
        return base
    raise ValueError(f"pretrain.schedule must be cosine, poly or constant, got {sched!r}")


def make_optimizer(p: dict, params) -> torch.optim.Optimizer:
    if p["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=float(p["lr"]), momentum=float(p.get("momentum", 0.9)),
                               weight_decay=float(p.get("weight_decay", 0.0)))
    if p["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=float(p["lr"]), weight_decay=float(p.get("weight_decay", 0.0)))
    raise ValueError(f"pretrain.optimizer must be sgd or adam, got {p['optimizer']!r}")


def build(cfg: dict, sources) -> tuple[Learner, torch.optim.Optimizer]:
    p = cfg["pretrain"]
    if p["method"] not in METHODS:
        raise ValueError(f"pretrain.method must be one of {METHODS}, got {p['method']!r}")
    channels, classes = set(), set()
    for s in sources:
        import zarr

        te = zarr.open_group(s.teacher_path, mode="r")
        channels.add(int(te["features"].shape[1]))
        classes.add(s.classes)
    if len(channels) > 1 or len(classes) > 1:
        raise StoreError(f"datasets disagree on the teacher's channels {channels} / classes {classes}")
    torch.manual_seed(int(p["seed"]))
    learner = Learner(p, channels.pop(), classes.pop())
    return learner, make_optimizer(p, learner.parameters())


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """This process's place in the data-parallel group (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def dist_backend(cfg: dict) -> str:
    """``pretrain.backend``: auto = nccl when the trainer runs on CUDA, gloo otherwise."""
    b = cfg["pretrain"].get("backend", "auto") or "auto"
    if b == "auto":
        return "nccl" if resolve_device(cfg["pretrain"].get("device")).type == "cuda" else "gloo"
    return str(b)


def init_distributed(cfg: dict) -> bool:
    """Join the process group that torchrun's environment describes (WORLD_SIZE > 1); True when
    this call created it (the caller then destroys it)."""
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return False
    backend = dist_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend=backend)
    info = dist_info()
    log.info("pretrain: rank %d of %d (backend %s, local rank %d)", info.rank, info.world, backend,
             info.local_rank)
    return True


class LossModule(torch.nn.Module):
    """The learner's loss as a module's forward, so that DistributedDataParallel sees the forward
    pass (its gradient all-reduce hooks are armed there)."""

    def __init__(self, learner: Learner, p: dict, device: torch.device, amp: bool):
        super().__init__()
        self.learner, self.p, self.device, self.amp = learner, p, device, amp

    def forward(self, batch: dict, step: int) -> torch.Tensor:
        return compute_loss(self.learner, batch, self.p, self.device, step, self.amp)


def wrap_ddp(learner: Learner, p: dict, device: torch.device, amp: bool):
    """DistributedDataParallel around the learner's loss: gradients are averaged over the ranks
    in backward; rank 0's weights and buffers are broadcast at construction. Inputs are not moved
    by DDP (device_ids None): compute_loss moves what it needs."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(LossModule(learner, p, device, amp), device_ids=None,
                                   find_unused_parameters=False)


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _mean_over_ranks(x: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    x = x.detach().float().reshape(1).clone()
    if info.world > 1:
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl":
            x = x.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(x)
        x = x / info.world
    return float(x.cpu()[0])


def _rank0_decides(info: DistInfo, fn):
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
    if info.world == 1:
        return fn()
    import torch.distributed as tdist

    box = [None]
    if info.main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank raises it
            box[0] = ("error", exc)
    tdist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


class _TensorBoard:
    """Scalars to ``<run dir>/tb/`` when ``torch.utils.tensorboard`` imports; otherwise off,
    said once in the log. ``purge_step`` hides the events a killed run logged after its last
    checkpoint."""

    def __init__(self, d: Path, start: int, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.info("pretrain: TensorBoard logging is off: the 'tensorboard' package is not installed "
                     "(%s); metrics.csv has every value", exc)
            return
        self.writer = SummaryWriter(log_dir=str(d / "tb"), purge_step=start if start > 0 else None)
        log.info("pretrain: TensorBoard scalars in %s", d / "tb")

    def add(self, row: dict) -> None:
        if self.writer is not None:
            for key in ("loss", "lr"):
                self.writer.add_scalar(f"pretrain/{key}", float(row[key]), int(row["step"]))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- run

def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path, learner: Learner, opt, step: int, upstream: dict, ident: str,
                    world: int = 1) -> None:
    state = {"step": step, "model": learner.net.state_dict(),
             "heads": {k: v for k, v in learner.state_dict().items() if not k.startswith("net.")},
             "optimizer": opt.state_dict(), "rng": _rng_state(), "upstream": upstream, "identity": ident}
    if world > 1:
        state["world_size"] = int(world)
    _write_atomic(path, lambda t: _torch_save(state, t))


def load_checkpoint(path: Path, learner: Learner, opt, upstream: dict, ident: str) -> int:
    """Restore a checkpoint of this identity and these caches; 0 when there is none."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("upstream") != upstream or state.get("identity") != ident:
        log.info("pretrain: %s is from other caches or settings; starting over", path)
        return 0
    learner.load_state_dict({**{f"net.{k}": v for k, v in state["model"].items()}, **state["heads"]})
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    info, was = dist_info(), int(state.get("world_size", 1))
    if info.world != was and info.main:
        log.warning("pretrain: %s was written by %d process(es), this run has %d: the batches stay the same, "
                    "but batch-norm statistics and the augmentation draws depend on the process count, so "
                    "from step %d on the result differs from an uninterrupted run", path, was, info.world,
                    int(state["step"]))
    return int(state["step"])


def _metrics_rows(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["step"]) <= upto]


METRICS = ["step", "loss", "lr", "time"]


def _write_metrics(path: Path, rows: list[dict], fields: list[str] = METRICS) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = 10
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label="mean of 10")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _write_atomic(path, lambda t: fig.savefig(t, dpi=100, format="png"))
    plt.close(fig)


def train(cfg: dict, stop_at: int | None = None) -> dict:
    """Train (or resume) the run of the current configuration. ``stop_at`` ends the process
    after that many total steps without completing the run (tests use it as a 'kill').
    Inside a data-parallel group every rank calls this; rank 0 alone writes the run folder."""
    p = cfg["pretrain"]
    dd = dist_info()
    sources = open_sources(cfg)  # refuses missing / incomplete / stale caches
    upstream = upstream_lineages(cfg)
    ident = sha256_json(identity(cfg))
    d = run_dir(cfg)
    info = _read_json(d / "run.json")
    _barrier(dd)  # every rank has read run.json before rank 0 changes the folder
    if info and info.get("complete") and info.get("upstream") == upstream:
        if dd.main:
            log.info("pretrain: %s is complete and up to date, nothing to do", d)
        rows = _metrics_rows(d / "metrics.csv", 1 << 62)
        return _summary(p, rows, d, 0.0, 0, "up to date")
    if dd.main:
        if info and info.get("upstream") != upstream and d.exists():
            log.info("pretrain: %s was trained on other caches; starting over", d)
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
    _barrier(dd)

    device = resolve_device(p.get("device"))
    if dd.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)  # one process per GPU
        torch.cuda.set_device(device)
    amp = bool(p.get("amp", True)) and device.type == "cuda"
    np.random.seed(int(p["seed"]) % (2 ** 32))
    learner, opt = build(cfg, sources)
    learner.to(device)
    total = int(p["iterations"])
    start = load_checkpoint(d / "checkpoint.pt", learner, opt, upstream, ident)
    rows = _metrics_rows(d / "metrics.csv", start - 1)
    _barrier(dd)  # every rank has read the checkpoint and the metrics before rank 0 rewrites them

    def run_info(complete: bool, step: int) -> dict:
        out = {"config": cfg, "identity_sha256": ident, "upstream": upstream,
               "complete": complete, "step": step, "steps": total}
        if dd.world > 1:
            out["world_size"] = dd.world
        return out

    if dd.main:
        _save_json(d / "run.json", run_info(False, start))
    end = total if stop_at is None else min(total, int(stop_at))
    every = max(1, int(p.get("checkpoint_every", 50)))
    clip = float(p.get("grad_clip", 0.0))
    ddp = wrap_ddp(learner, p, device, amp) if dd.world > 1 else None
    learner.train()
    t0 = time.perf_counter()
    fh = writer = None
    if dd.main:
        # the rows kept from an earlier run are rewritten atomically, then appended to: a kill
        # while the file is being rewritten must not lose the rows before the checkpoint
        _write_atomic(d / "metrics.csv", lambda t: _write_metrics(t, rows))
        fh = open(d / "metrics.csv", "a", newline="")
        writer = csv.DictWriter(fh, fieldnames=METRICS)
    tb = _TensorBoard(d, start, enabled=dd.main)
    step = start
    bar = progress_bar(end - start, f"pretrain/{p['method']}", "step", mininterval=1.0, disable=not dd.main)
    try:
        if start < end:
            for batch in loader(cfg, sources, start=start, stop=end, rank=dd.rank, world=dd.world):
                step = int(batch["step"])
                lr = lr_at(p, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                if ddp is None:
                    loss = compute_loss(learner, batch, p, device, step, amp)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step}")
                    value = loss.item()
                else:  # this rank's slice; DDP averages the gradients in backward
                    loss = ddp(batch, step)
                    value = _mean_over_ranks(loss, dd)
                    if not math.isfinite(value):
                        raise FloatingPointError(f"pretrain: mean loss over the ranks is {value} at step {step}")
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(learner.parameters(), clip)
                opt.step()
                row = {"step": step, "loss": f"{value:.6f}", "lr": f"{lr:.6g}",
                       "time": f"{time.perf_counter() - t0:.3f}"}
                rows.append(row)
                if dd.main:
                    writer.writerow(row)
                    tb.add(row)
                bar.set_postfix(loss=row["loss"], lr=row["lr"], refresh=False)
                bar.update(1)
                step += 1
                if dd.main and (step % every == 0 or step == end):
                    with writing(d / "metrics.csv", "write", RESUME):
                        fh.flush()
                    save_checkpoint(d / "checkpoint.pt", learner, opt, step, upstream, ident, dd.world)
                    _save_json(d / "run.json", run_info(False, step))
                    tb.flush()
    finally:
        bar.close()
        tb.close()
        try:
            if fh is not None:
                fh.close()
        except OSError:  # a failed write is being reported already; the checkpoint holds the rows
            pass
    seconds = time.perf_counter() - t0
    if step < total:
        _barrier(dd)  # the checkpoint is on disk before any rank returns
        return _summary(p, rows, d, seconds, step - start, "stopped")
    if dd.main:
        _write_atomic(d / "model.pt", lambda t: _torch_save(
            {"model": learner.net.state_dict(), "model_name": p["model"], "in_channels": 3,
             "out_channels": int(p["feature_dim"]), "method": p["method"], "steps": total}, t))
        if rows:
            plot_loss(rows, d / "loss.png", f"pretrain {p['method']} ({p['model']})")
        _save_json(d / "run.json", run_info(True, total))
    _barrier(dd)
    return _summary(p, rows, d, seconds, step - start, "trained")


def _summary(p: dict, rows: list[dict], d: Path, seconds: float, steps_now: int, status_: str) -> dict:
    last = [float(r["loss"]) for r in rows[-10:]]
    return {"method": p["method"], "status": status_, "steps": len(rows),
            "final_loss": round(float(np.mean(last)), 4) if last else None,
            "seconds": round(seconds, 2), "steps_per_s": round(steps_now / seconds, 3) if seconds > 0 else 0.0,
            "run_dir": str(d)}


def run(cfg: dict) -> list[dict]:
    """Run the pretrain stage; one summary row. One process per run folder: a second one on the
    same run is refused with a message (two would write the same checkpoint and metrics).
    Under torchrun (WORLD_SIZE > 1) every process joins the data-parallel group first; rank 0
    takes the lock and its verdict (or its refusal) reaches every rank."""
    import torch.distributed as tdist

    created = init_distributed(cfg)
    try:
        with ExitStack() as stack:
            _rank0_decides(dist_info(), lambda: stack.enter_context(
                stage_lock(get_workdir(cfg), f"pretrain-{run_dir(cfg).name}")) and None)
            return [train(cfg)]
    finally:
        if created:
            tdist.destroy_process_group()


__all__ = ["run", "status", "run_status", "train", "run_dir", "identity", "compute_loss", "Learner", "build",
           "lr_at", "upstream_lineages", "init_distributed", "dist_info", "wrap_ddp", "LossModule"]
