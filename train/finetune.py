"""Stage ``finetune``: 3D semantic segmentation on labelled scenes, from a pretrained SR-UNet or
from scratch, with the data-efficient protocols and semi-supervised options of the
Data-Efficient 3D Learner; evaluation on the validation split.

- Init (``finetune.init``): ``pretrain`` (the pretrain run of the current configuration),
  ``scratch``, or a path to a run folder / ``model.pt``. The network is rebuilt with
  ``num_classes`` outputs: every pretrained weight is loaded except the last 1x1 convolution
  (``final``), which is the fresh segmentation head (PointContrast / CSC / PPKT's protocol).
  Pretraining must not have seen the validation scenes: the run checks the pretrain run's
  datasets and refuses otherwise.
- Data: whole scenes (mesh vertices and colours), augmented (rotation about z, scaling,
  elastic distortion, mirror, colour), quantised at ``voxel_size`` (one voxel per occupied
  cell; each vertex keeps the index of its voxel). Features are colours in [-0.5, 0.5], as in
  pretraining.
- Supervision: cross-entropy on the supervised vertices, each taking the logits of its voxel:
  every labelled vertex, or only those of ``la_file`` (limited annotations); only the scenes
  of ``lr_file`` (limited reconstructions).
- Semi-supervised (``finetune.semi``): entropy minimisation, L_ent = (1/|U|) sum_{v in U}
  -sum_c p_vc log p_vc over the voxels U holding no supervised vertex; mean teacher, an EMA
  copy of the network (theta' <- a theta' + (1 - a) theta) sees a second augmentation of the
  same scenes and L_cons = MSE(softmax student, softmax teacher) per vertex, weighted by
  w(t) = w exp(-5 (1 - t)^2), t = min(step / rampup_steps, 1).
- Evaluation: every vertex of a validation scene takes the prediction of its voxel; scores
  from the confusion matrix over the original vertices (``lift3d.core.metrics``).

Runs go to ``<workdir>/runs/finetune/<name>/``: ``checkpoint.pt`` (resumable), ``model.pt``
(the segmentation network), ``metrics.csv``, ``loss.png``, ``eval.json``, ``eval.txt``,
``run.json``.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import MinkowskiEngine as ME
import numpy as np
import torch
import torch.nn.functional as F

from lift3d.core.checkpoint import read_model_file as _read_model_file
from lift3d.core.checkpoint import state_dict_mismatch
from lift3d.core.config import resolve_path, sha256_json
from lift3d.core.config import workdir as get_workdir
from lift3d.core.device import resolve_device
from lift3d.core.errors import FinetuneError
from lift3d.core.metrics import confusion_matrix, format_table, segmentation_scores
from lift3d.core.progress import bar as progress_bar
from lift3d.core.store import StoreError
from lift3d.nets.backbones2d import sha256_path
from lift3d.nets.res16unet import MODELS
from lift3d.nets.sparse import backend_of, build_model, check_backend, checkpoint_backend, sparse_input, weights_for
from lift3d.pipeline.readers.base import ReaderError, make_reader
from lift3d.train import augment as A
from lift3d.train import pretrain
from lift3d.train.optim import lr_at, make_optimizer
from lift3d.train.runs import Run, read_json, rows_before, run_lock, run_status, save_json, write_atomic
from lift3d.train.scenes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    LabelledDataset,
    make_la_file,
    read_la_file,
    read_lr_file,
)

log = logging.getLogger("lift3d")

BOOKKEEPING = ("device", "checkpoint_every", "run_name", "eval_every")
CONSISTENCY_POINTS = 4096  # vertices per scene compared by the mean-teacher consistency


# ----------------------------------------------------------------------------- configuration


def dataset_entry(cfg: dict) -> dict:
    name = cfg["finetune"].get("dataset")
    entries = cfg["datasets"]
    if name is None:
        return entries[0]
    for e in entries:
        if e["name"] == name:
            return e
    raise FinetuneError(
        f"finetune.dataset: {name!r} is not configured; datasets: {', '.join(e['name'] for e in entries)}"
    )


def _init_kind(cfg: dict) -> str:
    init = cfg["finetune"]["init"]
    return init if init in ("pretrain", "scratch") else "file"


def _pretrain_run(cfg: dict) -> Path:
    return pretrain.run_dir(cfg)


def init_path(cfg: dict) -> Path | None:
    """The model.pt fine-tuning starts from (None for scratch). A relative ``finetune.init`` is
    looked up under the workdir first, then in the current folder."""
    kind = _init_kind(cfg)
    if kind == "scratch":
        return None
    p = _pretrain_run(cfg) if kind == "pretrain" else resolve_path(cfg, cfg["finetune"]["init"])
    return p / "model.pt" if p.is_dir() or kind == "pretrain" else p


def missing_init(cfg: dict) -> str:
    """The error for a ``finetune.init`` path that names no file, with every place looked at."""
    value = cfg["finetune"]["init"]
    p = Path(str(value)).expanduser()
    msg = f"finetune.init: {value}: no such checkpoint (a run folder or its model.pt)"
    if p.is_absolute():
        return msg
    return f"{msg}: neither {get_workdir(cfg) / p} (under the workdir) nor {Path.cwd() / p} (the current folder)"


def init_identity(cfg: dict) -> dict:
    kind = _init_kind(cfg)
    if kind == "scratch":
        return {"init": "scratch"}
    if kind == "pretrain":
        return {"init": "pretrain", "pretrain": sha256_json(pretrain.identity(cfg))}
    path = init_path(cfg)
    return {"init": "file", "sha256": sha256_path(path) if path.is_file() else f"missing:{path}"}


def la_path(cfg: dict) -> Path | None:
    """The LA file to read: ``la_file``, or the one ``la_points`` names (written on first use)."""
    f = cfg["finetune"]
    if f.get("la_file") and f.get("la_points"):
        raise FinetuneError("finetune.la_file and finetune.la_points are both set; choose one")
    if f.get("la_points"):  # one draw per seed: the runs of a seed share it (paired seeds)
        return la_file_for(cfg, int(f["la_points"]), int(f.get("seed") or 0))
    return Path(f["la_file"]).expanduser() if f.get("la_file") else None


def la_file_for(cfg: dict, points: int, seed: int = 0) -> Path:
    """The LA file of ``points`` labelled vertices per training scene (written once)."""
    entry = dataset_entry(cfg)
    out = get_workdir(cfg) / "data_efficient" / entry["name"] / f"points{points}_seed{seed}.pth"
    if not out.exists():
        ds = LabelledDataset(entry, get_workdir(cfg))
        make_la_file(ds, ds.split("train"), points, seed, out)
    return out


def identity(cfg: dict) -> dict:
    f = {k: v for k, v in cfg["finetune"].items() if k not in BOOKKEEPING and k != "init"}
    for key, default in (("backbone_lr_mult", 1.0), ("probe_steps", 0)):
        if f.get(key) == default:
            f.pop(key, None)  # the default: runs keep the identity they had before the key
    if f.get("la_file") and f.get("la_points"):
        raise FinetuneError("finetune.la_file and finetune.la_points are both set; choose one")
    if f.get("la_points"):
        f["la_draw"] = "per seed"  # the labelled vertices are drawn with the run's seed
    for key in ("la_file", "lr_file"):  # the files' contents, not only their names
        if f.get(key):
            p = Path(f[key]).expanduser()
            f[key] = {"path": str(p), "sha256": sha256_path(p) if p.is_file() else None}
    f.pop("sparse_backend", None)
    backend = _identity_backend(cfg)
    if backend is not None:
        f["sparse_backend"] = backend
    return {"finetune": f, "dataset": dataset_entry(cfg), **init_identity(cfg)}


def sparse_backend(cfg: dict, checkpoint: dict | None = None) -> str:
    """The sparse backend fine-tuning runs on: ``finetune.sparse_backend``; when null, the
    checkpoint's (init from a file or the pretrain run), else ``pretrain.sparse_backend`` (scratch)."""
    value = cfg["finetune"].get("sparse_backend")
    if value is not None:
        return check_backend(value, "finetune.sparse_backend")
    if checkpoint is not None:
        return checkpoint_backend(checkpoint)
    return check_backend(cfg["pretrain"].get("sparse_backend"), "pretrain.sparse_backend")


def _identity_backend(cfg: dict) -> str | None:
    """The backend as the identity holds it: a file's own is implied by its sha256 (only an explicit
    value enters); otherwise the backend, left out when it is the default (identities from before
    the key stay)."""
    if _init_kind(cfg) == "file":
        value = cfg["finetune"].get("sparse_backend")
        return None if value is None else check_backend(value, "finetune.sparse_backend")
    backend = sparse_backend(cfg)  # init pretrain: the pretrain run's (pretrain.sparse_backend)
    return None if backend == "minkowski" else backend


def run_dir(cfg: dict) -> Path:
    f = cfg["finetune"]
    kind = _init_kind(cfg)
    tag = {"scratch": "scratch", "file": "file"}.get(kind) or f"from-{cfg['pretrain']['method']}"
    name = f.get("run_name") or f"{tag}-{sha256_json(identity(cfg))[:10]}"
    return get_workdir(cfg) / "runs" / "finetune" / name


def status(cfg: dict) -> tuple[str, list[str]]:
    reasons = []
    if _init_kind(cfg) == "pretrain":
        st, why = pretrain.status(cfg)
        if st != "done":
            reasons.append(f"the pretrain run to start from is {st}: run 'lift3d run pretrain'")
    d = run_dir(cfg)
    where = f"runs/finetune/{d.name}"
    state, why, info = run_status(d, where, reasons)
    if state != "done":
        return state, why
    ev = info.get("eval") or {}
    return "done", [f"{where} complete: val mIoU {_pct(ev.get('miou'))}, mAcc {_pct(ev.get('macc'))}"]


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


# ----------------------------------------------------------------------------- checkpoints


def read_model_file(path: str | Path) -> dict:
    """A ``model.pt`` (or a run folder holding one) as a dict, checked to be a Res16UNet."""
    state = _read_model_file(path, error=FinetuneError)
    name = state.get("model_name")
    if name not in MODELS:
        raise FinetuneError(f"{state['path']}: architecture {name!r} is not one of {', '.join(sorted(MODELS))}")
    try:
        checkpoint_backend(state)
    except ValueError as exc:
        raise FinetuneError(f"{state['path']}: {exc}") from None
    return state


def _load_weights(net: torch.nn.Module, sd: dict, where: str, skip_final: bool) -> None:
    """Load ``sd`` into ``net``: the same key names and shapes (``final.*`` skipped when asked)."""
    keep = {k: v for k, v in sd.items() if not (skip_final and k.startswith("final."))}
    need = {k: v for k, v in net.state_dict().items() if not (skip_final and k.startswith("final."))}
    missing, extra, shape = state_dict_mismatch(need, keep)
    if missing or extra or shape:
        raise FinetuneError(
            f"{where}: the weights do not fit {type(net).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
            f"(e.g. {extra[:2]}), {len(shape)} of another shape (e.g. {shape[:2]})"
        )
    net.load_state_dict(keep, strict=False)


def build_network(cfg: dict) -> tuple[torch.nn.Module, dict]:
    """The segmentation network (``num_classes`` outputs), pretrained weights loaded when asked."""
    f = cfg["finetune"]
    path = init_path(cfg)
    meta = {"init": _init_kind(cfg), "init_path": str(path) if path else None}
    if path is None:
        name = f.get("model") or cfg["pretrain"]["model"]
        torch.manual_seed(int(f["seed"]))
        backend = sparse_backend(cfg)
        return build_model(name, 3, NUM_CLASSES, backend=backend), {**meta, "model_name": name, "backend": backend}
    if _init_kind(cfg) == "pretrain" and not path.is_file():
        raise FinetuneError(
            f"finetune.init: pretrain: {path} does not exist: run 'lift3d run pretrain' first "
            f"(or set finetune.init: scratch)"
        )
    if _init_kind(cfg) == "file" and not path.exists():
        raise FinetuneError(missing_init(cfg))
    state = read_model_file(path)
    name = state["model_name"]
    if f.get("model") and f["model"] != name:
        raise FinetuneError(f"{path}: the checkpoint is a {name}, but finetune.model is {f['model']!r}")
    torch.manual_seed(int(f["seed"]))
    backend = sparse_backend(cfg, state)
    net = build_model(name, int(state.get("in_channels", 3)), NUM_CLASSES, backend=backend)
    _load_weights(net, weights_for(net, state["model"], checkpoint_backend(state)), str(path), skip_final=True)
    return net, {**meta, "model_name": name, "pretrain_method": state.get("method"), "backend": backend}


def check_val_unseen(cfg: dict, ds: LabelledDataset, val: list[str]) -> None:
    """Refuse when the pretrain run to start from read frames of a validation scene."""
    if _init_kind(cfg) == "scratch":
        return
    path = init_path(cfg)
    if _init_kind(cfg) == "file" and not path.exists():
        raise FinetuneError(missing_init(cfg))
    info = read_json(path.parent / "run.json") if path else None
    if not info or "config" not in info:
        log.warning(
            "finetune: %s has no run.json beside it; cannot check that pretraining did not see the validation scenes",
            path,
        )
        return
    wd = get_workdir(cfg)
    for entry in info["config"].get("datasets", []):
        if entry.get("kind") not in ("scannet", "synthetic"):
            continue
        try:
            reader = make_reader(entry, wd)
            same = reader.root is not None and Path(reader.root).resolve() == ds.root.resolve()
            seen = reader.scenes() if same else []
        except ReaderError as exc:
            raise FinetuneError(
                f"cannot check which scenes pretraining saw (dataset {entry['name']!r}): {exc}"
            ) from None
        leaked = sorted(set(seen) & set(val))
        if leaked:
            raise FinetuneError(
                f"pretraining ({path.parent}) read frames of {len(leaked)} validation scene(s) "
                f"({', '.join(leaked[:3])}) through dataset {entry['name']!r} (split {entry.get('split')!r}); "
                f"fine-tuning would be evaluated on scenes the network has seen. Pretrain with split: train."
            )


# ----------------------------------------------------------------------------- data


def augment_scene(xyz: np.ndarray, rgb: np.ndarray, acfg: dict, rng: np.random.Generator):
    """The scene-level augmentations switched on in ``finetune.augment`` (world z up)."""
    coords = xyz - xyz.mean(0, keepdims=True)
    if acfg.get("rotate_up", True):
        coords = A.rotate_up(coords, "world", rng)
    if acfg.get("flip", True) and rng.random() < 0.5:
        coords = coords * np.array([-1.0, 1.0, 1.0], np.float32)
    if acfg.get("scale", True):
        lo, hi = acfg.get("scale_range", [0.9, 1.1])
        coords = A.random_scale(coords, lo, hi, rng)
    if acfg.get("elastic", True):
        for gran, mag in A.ELASTIC_PARAMS:
            coords = A.elastic_distortion(coords, gran, mag, rng)
    if acfg.get("color", True):
        rgb = A.color_jitter(A.chromatic_auto_contrast(rgb, rng), rng)
    return np.ascontiguousarray(coords, np.float32), rgb


def voxelise(scenes: list[tuple[np.ndarray, np.ndarray]], voxel_size: float) -> dict:
    """Quantise each (coords, rgb) scene and batch them: ``coords`` (M, 4) int32 with the batch
    index first, ``feats`` (M, 3) colours in [-0.5, 0.5], and per scene ``vertex_voxel``, the
    batch row of each vertex's voxel."""
    qs, feats, inverse, offset = [], [], [], 0
    for coords, rgb in scenes:
        q, keep, inv = ME.utils.sparse_quantize(
            np.ascontiguousarray(coords, np.float32),
            return_index=True,
            return_inverse=True,
            quantization_size=voxel_size,
        )
        qs.append(q)
        feats.append(torch.from_numpy(rgb[keep.numpy()].astype(np.float32) / 255.0 - 0.5))
        inverse.append(inv.long() + offset)
        offset += len(keep)
    return {
        "coords": ME.utils.batched_coordinates(qs, dtype=torch.int32),
        "feats": torch.cat(feats),
        "vertex_voxel": inverse,
    }


def forward(net, batch: dict, device: torch.device) -> torch.Tensor:
    x = sparse_input(batch["feats"].to(device), batch["coords"].to(device), backend_of(net))
    return net(x).F


def scene_order(names: list[str], seed: int, step: int, batch_size: int) -> list[str]:
    """The scenes of step ``step``: epochs of seeded permutations, cut into batches (a pure
    function of (seed, step), so a resumed run sees the same batches)."""
    n = len(names)
    out = []
    for j in range(batch_size):
        t = step * batch_size + j
        perm = np.random.default_rng([seed, t // n]).permutation(n)
        out.append(names[perm[t % n]])
    return out


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(net, ds: LabelledDataset, scenes: list[str], voxel_size: float, device: torch.device) -> dict:
    """Scores over the original vertices of ``scenes`` (each takes its voxel's prediction)."""
    was = net.training
    net.eval()
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    try:
        for name in scenes:
            s = ds.scene(name)
            batch = voxelise([(s.xyz - s.xyz.mean(0, keepdims=True), s.rgb)], voxel_size)
            pred = forward(net, batch, device).argmax(1).cpu()[batch["vertex_voxel"][0]].numpy()
            conf += confusion_matrix(s.labels, pred, NUM_CLASSES, IGNORE_INDEX)
    finally:
        net.train(was)
    return {**segmentation_scores(conf, CLASS_NAMES), "scenes": len(scenes), "confusion": conf.tolist()}


# ----------------------------------------------------------------------------- training


def supervision(cfg: dict, ds: LabelledDataset, train: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(scenes to train on, scene -> supervised vertex indices) under the LA / LR protocols."""
    f = cfg["finetune"]
    scenes = list(train)
    if f.get("lr_file"):
        scenes = read_lr_file(Path(f["lr_file"]).expanduser(), train)
    la_file = la_path(cfg)
    if la_file is not None:
        counts = {s: len(ds.scene(s).labels) for s in train}
        la = read_la_file(la_file, counts)
        sup = {s: la.get(s, np.zeros(0, np.int64)) for s in scenes}
    else:
        sup = {s: np.flatnonzero(ds.scene(s).labels != IGNORE_INDEX) for s in scenes}
    sup = {s: v[ds.scene(s).labels[v] != IGNORE_INDEX] for s, v in sup.items()}
    if sum(len(v) for v in sup.values()) == 0:
        raise FinetuneError("no labelled vertex to train on (la_file / lr_file select none with a ScanNet-20 label)")
    return scenes, sup


def entropy_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over the rows in ``mask`` (0 when there are none)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    logp = F.log_softmax(logits[mask], dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def rampup(step: int, ramp: int) -> float:
    """exp(-5 (1 - t)^2), t = min(step / ramp, 1) (Laine & Aila's sigmoid ramp-up)."""
    if ramp <= 0:
        return 1.0
    t = min(step / ramp, 1.0)
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """theta' <- decay theta' + (1 - decay) theta; buffers (BN statistics) copied."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(decay).add_(ps.detach(), alpha=1.0 - decay)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def step_loss(net, teacher, ds, names, sup, f, step, device) -> tuple[torch.Tensor, dict]:
    """The loss of one step: supervised CE, plus the semi-supervised terms switched on."""
    semi = f["semi"]
    rng = np.random.default_rng([int(f["seed"]), step, 1])
    scenes = [ds.scene(n) for n in names]
    views = [augment_scene(s.xyz, s.rgb, f["augment"], rng) for s in scenes]
    batch = voxelise(views, float(f["voxel_size"]))
    logits = forward(net, batch, device)
    rows, targets = [], []
    for s, n, vv in zip(scenes, names, batch["vertex_voxel"]):
        idx = torch.from_numpy(sup[n])
        rows.append(vv[idx])
        targets.append(torch.from_numpy(s.labels[sup[n]]))
    rows, targets = torch.cat(rows).to(device), torch.cat(targets).to(device)
    loss = F.cross_entropy(logits[rows], targets) if len(rows) else logits.sum() * 0.0
    parts = {"ce": float(loss.detach())}
    if float(semi["entropy_weight"]) > 0:
        unlabelled = torch.ones(len(logits), dtype=torch.bool, device=device)
        unlabelled[rows] = False
        ent = entropy_loss(logits, unlabelled)
        loss = loss + float(semi["entropy_weight"]) * ent
        parts["entropy"] = float(ent.detach())
    if teacher is not None:
        trng = np.random.default_rng([int(f["seed"]), step, 2])
        tb = voxelise([augment_scene(s.xyz, s.rgb, f["augment"], trng) for s in scenes], float(f["voxel_size"]))
        with torch.no_grad():
            tlogits = forward(teacher, tb, device)
        sr, tr = [], []
        for s, vs, vt in zip(scenes, batch["vertex_voxel"], tb["vertex_voxel"]):
            pick = torch.from_numpy(rng.choice(len(vs), size=min(CONSISTENCY_POINTS, len(vs)), replace=False))
            sr.append(vs[pick])
            tr.append(vt[pick])
        sr, tr = torch.cat(sr).to(device), torch.cat(tr).to(device)
        cons = F.mse_loss(F.softmax(logits[sr], 1), F.softmax(tlogits[tr], 1))
        w = float(semi["consistency_weight"]) * rampup(step, int(semi["rampup_steps"]))
        loss = loss + w * cons
        parts["consistency"] = float(cons.detach())
    return loss, parts


def set_frozen(net: torch.nn.Module, frozen: bool) -> None:
    """Freeze every layer but the head (``final``): no gradients, batch norm on its running
    statistics (a linear probe of the features); unfreeze again with ``frozen=False``."""
    for n, p in net.named_parameters():
        if not n.startswith("final."):
            p.requires_grad_(not frozen)
    for n, m in net.named_modules():
        if n and not n.startswith("final") and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(not frozen and net.training)


def train(cfg: dict, stop_at: int | None = None) -> dict:
    """Fine-tune (or resume) the run of the current configuration, then evaluate on val."""
    f = dict(cfg["finetune"])
    f["voxel_size"] = float(f.get("voxel_size") or cfg["pretrain"]["voxel_size"])
    wd = get_workdir(cfg)
    entry = dataset_entry(cfg)
    ds = LabelledDataset(entry, wd)
    train_scenes, val = ds.split("train"), ds.split("val")
    if not val:
        raise FinetuneError(f"{ds.root}/scannetv2_val.txt lists no scenes: nothing to evaluate on")
    leak = sorted(set(train_scenes) & set(val))
    if leak:
        raise FinetuneError(f"{ds.root}: scenes in both the train and the val split: {', '.join(leak[:3])}")
    check_val_unseen(cfg, ds, val)
    scenes, sup = supervision(cfg, ds, train_scenes)
    run = Run("finetune", run_dir(cfg), sha256_json(identity(cfg)))
    if run.is_done():
        log.info("finetune: %s is complete and up to date, nothing to do", run.path)
        return _summary(f, run.info, run.path, 0.0, "up to date")
    run.prepare()

    device = resolve_device(f.get("device"), "finetune.device")
    net, meta = build_network(cfg)
    net.to(device)
    teacher = None
    if f["semi"]["mean_teacher"]:
        # a fresh network, not a deep copy: MinkowskiEngine modules cannot be deep-copied
        teacher = build_model(meta["model_name"], 3, NUM_CLASSES, backend=meta["backend"]).to(device)
        teacher.load_state_dict(net.state_dict())
        for p in teacher.parameters():
            p.requires_grad_(False)
    head = [p for n, p in net.named_parameters() if n.startswith("final.")]
    body = [p for n, p in net.named_parameters() if not n.startswith("final.")]
    pretrained = meta["init"] != "scratch"  # the two settings keep what a pretrained start knows
    body_mult = float(f.get("backbone_lr_mult", 1.0)) if pretrained else 1.0
    opt = make_optimizer(f, [{"params": body, "mult": body_mult}, {"params": head, "mult": 1.0}])
    probe_steps = int(f.get("probe_steps") or 0) if pretrained else 0
    total = int(f["iterations"])
    start = 0
    state = run.load_checkpoint()
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        start = int(state["step"])
    base = {
        "config": cfg,
        "steps": total,
        "meta": meta,
        "scenes": {"train": scenes, "val": val},
        "supervised_vertices": int(sum(len(v) for v in sup.values())),
    }
    run.mark(base, start)
    every = max(1, int(f.get("checkpoint_every", 50)))
    eval_every = int(f.get("eval_every") or 0)
    clip = float(f.get("grad_clip", 0.0))
    end = total if stop_at is None else min(total, int(stop_at))
    fields = ["step", "loss", "ce", "entropy", "consistency", "lr", "val_miou", "time"]
    rows = rows_before(run.metrics_path, start)
    t0 = time.perf_counter()
    peak_rss = 0
    net.train()
    metrics = run.open_metrics(fields, rows)
    step = start
    label = f"pretrain-{cfg['pretrain']['method']}" if meta["init"] == "pretrain" else meta["init"]
    bar = progress_bar(end - start, f"finetune/{label}", "step", mininterval=1.0)  # two runs may share a log
    try:
        for step in range(start, end):
            lr = lr_at(f, step)
            warmup = step < probe_steps  # the head alone learns, on the frozen network's features
            for i, g in enumerate(opt.param_groups):  # group 0: the network, group 1: the head
                g["lr"] = 0.0 if warmup and i == 0 else lr * g["mult"]
            set_frozen(net, warmup)
            names = scene_order(scenes, int(f["seed"]), step, int(f["batch_size"]))
            opt.zero_grad(set_to_none=True)
            loss, parts = step_loss(net, teacher, ds, names, sup, f, step, device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: loss is {loss.item()} at step {step}")
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            if teacher is not None:
                ema_update(teacher, net, float(f["semi"]["ema_decay"]))
            row = {
                "step": step,
                "loss": f"{loss.item():.6f}",
                "lr": f"{lr:.6g}",
                "time": f"{time.perf_counter() - t0:.3f}",
                **{k: f"{v:.6f}" for k, v in parts.items()},
            }
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < total:
                row["val_miou"] = f"{evaluate(net, ds, val, f['voxel_size'], device)['miou'] or 0:.4f}"
            metrics.write(row)
            rows.append(row)
            peak_rss = max(peak_rss, _rss_mb())
            bar.set_postfix(loss=row["loss"], refresh=False)
            bar.update(1)
            if (step + 1) % every == 0 or step + 1 == end:
                metrics.flush()
                state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
                if teacher is not None:
                    state["teacher"] = teacher.state_dict()
                run.save_checkpoint(step + 1, state)
                run.mark(base, step + 1)
        else:
            step = end
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - t0
    if step < total or end < total:
        return {"init": meta["init"], "status": "stopped", "steps": len(rows), "run_dir": str(run.path)}
    ev = evaluate(net, ds, val, f["voxel_size"], device)
    model = {
        "model": net.state_dict(),
        "model_name": meta["model_name"],
        "backend": meta["backend"],
        "in_channels": 3,
        "out_channels": NUM_CLASSES,
        "num_classes": NUM_CLASSES,
        "classes": CLASS_NAMES,
        "ignore_index": IGNORE_INDEX,
        "voxel_size": f["voxel_size"],
        "init": meta["init"],
        "method": "finetune",
        "steps": total,
    }
    save_json(run.path / "eval.json", {k: v for k, v in ev.items()})
    title = (
        f"finetune {meta['init']}{'/' + str(meta.get('pretrain_method')) if meta['init'] != 'scratch' else ''}"
        f" ({meta['model_name']}, {total} steps) on {len(val)} val scenes"
    )
    write_atomic(run.path / "eval.txt", lambda t: t.write_text(format_table(ev, title) + "\n"))
    timing = {
        "seconds": round(seconds, 2),
        "s_per_step": round(seconds / max(1, end - start), 3),
        "peak_rss_mb": peak_rss,
    }
    evs = {k: ev[k] for k in ("miou", "macc", "overall_acc")}
    run.finish(model, base, total, rows, f"finetune ({meta['init']})", timing=timing, eval=evs)
    log.info("finetune: val mIoU %s mAcc %s (%s)", _pct(ev["miou"]), _pct(ev["macc"]), run.path)
    return _summary(f, run.info, run.path, seconds, "trained")


def _rss_mb() -> int:
    """Peak resident memory of this process so far, MB (Linux ru_maxrss is in KB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def _summary(f: dict, info: dict, d: Path, seconds: float, status_: str) -> dict:
    ev = info.get("eval") or {}
    return {
        "init": info["meta"]["init"],
        "status": status_,
        "steps": info["steps"],
        "val_miou": _pct(ev.get("miou")),
        "val_macc": _pct(ev.get("macc")),
        "seconds": round(seconds, 1),
        "run_dir": str(d),
    }


def run(cfg: dict) -> list[dict]:
    """One summary row. One process per run folder: a second one on the same run is refused."""
    try:
        with run_lock(get_workdir(cfg), "finetune", run_dir(cfg)):
            return [train(cfg)]
    except (ReaderError, StoreError) as exc:
        raise FinetuneError(str(exc)) from None


# ----------------------------------------------------------------------------- eval CHECKPOINT


def load_segmentation_model(path: str | Path, backend: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A fine-tuned network from a run folder or model.pt, checked: segmentation head with the
    benchmark's class count, weights that fit the named architecture; built on ``backend``
    (None: the checkpoint's own), its weights converted when that differs."""
    state = read_model_file(path)
    where = state["path"]
    if "num_classes" not in state:
        raise FinetuneError(
            f"{where}: a {state.get('method', 'pretrain')} checkpoint without a segmentation "
            f"head (no 'num_classes'); fine-tune it first: lift3d run finetune -o "
            f"finetune.init={Path(where).parent}"
        )
    if int(state["num_classes"]) != NUM_CLASSES:
        raise FinetuneError(
            f"{where}: the checkpoint predicts {state['num_classes']} classes, the ScanNet benchmark has {NUM_CLASSES}"
        )
    src = checkpoint_backend(state)
    net = build_model(
        state["model_name"],
        int(state.get("in_channels", 3)),
        int(state["num_classes"]),
        backend=check_backend(backend or src, "finetune.sparse_backend"),
    )
    _load_weights(net, weights_for(net, state["model"], src), where, skip_final=False)
    return net, state


def eval_checkpoint(cfg: dict, path: str | Path, split: str = "val", dataset: str | None = None) -> dict:
    """``lift3d eval CHECKPOINT``: scores of a fine-tuned network on a split of a labelled dataset."""
    net, state = load_segmentation_model(path, cfg["finetune"].get("sparse_backend"))
    if dataset:
        cfg = {**cfg, "finetune": {**cfg["finetune"], "dataset": dataset}}
    ds = LabelledDataset(dataset_entry(cfg), get_workdir(cfg))
    device = resolve_device(cfg["finetune"].get("device"), "finetune.device")
    net.to(device)
    res = evaluate(net, ds, ds.split(split), float(state["voxel_size"]), device)
    return {"checkpoint": state["path"], "split": split, **res}


__all__ = [
    "run",
    "status",
    "train",
    "run_dir",
    "identity",
    "evaluate",
    "eval_checkpoint",
    "FinetuneError",
    "load_segmentation_model",
    "read_model_file",
    "build_network",
    "augment_scene",
    "voxelise",
    "entropy_loss",
    "rampup",
    "ema_update",
    "scene_order",
    "dataset_entry",
]
