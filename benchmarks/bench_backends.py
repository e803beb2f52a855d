"""The two sparse backends side by side: MinkowskiEngine and spconv on the same batches.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_backends.py [--model Res16UNet14A --voxel 0.05
        --batch 4 --frames 8 --reps 4]

Builds small stores with the real stages (one synthetic room -> frames -> teacher -> points) and
generates the demo's labelled rooms, in a temporary workdir. Then, in one process, one thread:

- pretraining step: a ppnce step (lift3d.train.pretrain.compute_loss, backward, SGD) on the
  same collated batches from the cache, for each backend;
- fine-tuning step: one voxelised room (the demo's batch), forward, cross-entropy on the labelled
  vertices, backward, SGD, for each backend;

the two backends alternated step by step (the order flipped every repetition), the same starting
weights (MinkowskiEngine's, converted), after one warm-up step each. Printed: median and min per step.

Peak memory per backend: a fresh process per backend and kind runs two steps on the same batches
and reports its resident memory before the first step (data, network and optimiser in place) and
the peak during the steps (the kernel's VmHWM, reset just before them), so the figures do not mix.

``--device cuda`` times the steps on the GPU instead (synchronised; the heads in bf16 autocast as the
trainer runs them) and reports each backend's peak CUDA memory per step (torch's allocator) instead
of the resident memory; MinkowskiEngine takes part only where its build has CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.nets.sparse import BACKENDS, build_model, weights_for
from lift3d.train import data as D
from lift3d.train import finetune as FT
from lift3d.train import pretrain as P
from lift3d.train.scenes import IGNORE_INDEX, NUM_CLASSES, LabelledDataset


def make_cfg(wd: Path, a) -> dict:
    cfg = C.defaults()
    cfg["workdir"] = str(wd)
    cfg["datasets"] = [
        {"name": "bench", "kind": "synthetic", "root": None, "frame_skip": 1, "split": "all", "scenes": 2, "seed": 0}
    ]
    cfg["datasets"][0]["frames_per_scene"] = a.frames
    cfg["cluster"]["n_workers"] = 0
    cfg["teacher"].update({"device": "cpu", "batch_size": 8})
    cfg["pretrain"].update(
        {"model": a.model, "voxel_size": a.voxel, "batch_size": a.batch, "device": a.device, "method": "ppnce"}
    )
    cfg["finetune"].update({"init": "scratch", "model": a.model, "voxel_size": a.voxel, "device": a.device})
    return cfg


def status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> None:
    """Restart the peak-resident counter (VmHWM) at the current size (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


class Bench:
    """Everything both backends share: the pretraining batches, the fine-tuning rooms."""

    def __init__(self, wd: Path, a, kinds=("pretrain", "finetune")):
        self.a = a
        self.device = torch.device(a.device)
        self.amp = self.device.type == "cuda"
        self.backends = [b for b in BACKENDS if self.device.type == "cpu" or b == "spconv" or _me_cuda()]
        self.cfg = make_cfg(wd, a)
        self.src = D.open_sources(self.cfg)
        self.pre_batches = list(D.loader(self.cfg, self.src, start=0, stop=a.reps + 1)) if "pretrain" in kinds else []
        self.rooms = []
        if "finetune" not in kinds:
            return
        ds = LabelledDataset(self.cfg["datasets"][0], wd)
        names = ds.split("train")[:2] or sorted(p.name for p in ds.scans.iterdir())[:2]
        for n in names:
            s = ds.scene(n)
            batch = FT.voxelise([(s.xyz - s.xyz.mean(0, keepdims=True), s.rgb)], a.voxel)
            sup = torch.from_numpy(np.flatnonzero(s.labels != IGNORE_INDEX))
            rows = batch["vertex_voxel"][0][sup].to(self.device)
            self.rooms.append((batch, rows, torch.from_numpy(s.labels[sup.numpy()]).long().to(self.device)))

    def learners(self):
        """{backend: (learner, optimiser)} with the same starting weights."""
        out = {}
        for b in BACKENDS:
            cfg = {**self.cfg, "pretrain": {**self.cfg["pretrain"], "sparse_backend": b}}
            out[b] = P.build(cfg, self.src)
        ref = out["minkowski"][0]
        sp = out["spconv"][0]
        sp.net.load_state_dict(weights_for(sp.net, ref.net.state_dict(), "minkowski"))
        sp.load_state_dict({**{f"net.{k}": v for k, v in sp.net.state_dict().items()}, **_heads(ref)})
        for b in BACKENDS:  # the optimisers hold no state yet: moving the parameters in place is safe
            out[b][0].to(self.device).train()
        return {b: out[b] for b in self.backends}

    def seg_nets(self):
        torch.manual_seed(0)
        me = build_model(self.a.model, 3, NUM_CLASSES)
        sp = build_model(self.a.model, 3, NUM_CLASSES, backend="spconv")
        sp.load_state_dict(weights_for(sp, me.state_dict(), "minkowski"))
        nets = {b: n.to(self.device).train() for b, n in (("minkowski", me), ("spconv", sp)) if b in self.backends}
        return {b: (n, torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9)) for b, n in nets.items()}

    def pretrain_step(self, learner, opt, batch, step):
        opt.zero_grad(set_to_none=True)
        loss = P.compute_loss(learner, batch, self.cfg["pretrain"], self.device, step, self.amp)
        loss.backward()
        opt.step()

    def finetune_step(self, net, opt, room):
        batch, rows, labels = room
        opt.zero_grad(set_to_none=True)
        logits = FT.forward(net, batch, self.device)
        F.cross_entropy(logits[rows], labels).backward()
        opt.step()


def _me_cuda() -> bool:
    import MinkowskiEngine as ME

    return bool(ME.is_cuda_available())


def _heads(learner) -> dict:
    return {k: v for k, v in learner.state_dict().items() if not k.startswith("net.")}


def timed(fn, *args, device: torch.device, peaks: list | None = None) -> float:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize(device)
        if peaks is not None:
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    return time.perf_counter() - t


def alternate(bench: Bench) -> tuple[dict, dict]:
    """Per backend and kind, the step times (warm-up left out), the backends alternated; on CUDA
    also each step's peak CUDA memory (MiB)."""
    bks = bench.backends
    times = {(b, k): [] for b in bks for k in ("pretrain", "finetune")}
    peaks = {(b, k): [] for b in bks for k in ("pretrain", "finetune")}
    learners, segs = bench.learners(), bench.seg_nets()
    for b in bks:  # warm-up
        bench.pretrain_step(*learners[b], bench.pre_batches[0], 0)
        bench.finetune_step(*segs[b], bench.rooms[0])
    dev = bench.device
    for r in range(bench.a.reps):
        order = bks if r % 2 == 0 else bks[::-1]
        batch = bench.pre_batches[1 + r]
        for b in order:
            t = timed(bench.pretrain_step, *learners[b], batch, 1 + r, device=dev, peaks=peaks[(b, "pretrain")])
            times[(b, "pretrain")].append(t)
        room = bench.rooms[r % len(bench.rooms)]
        for b in order:
            t = timed(bench.finetune_step, *segs[b], room, device=dev, peaks=peaks[(b, "finetune")])
            times[(b, "finetune")].append(t)
    return times, peaks


MEM_STEPS = 2  # steps per memory child: the first allocates what every later step reuses


def mem_child(a) -> None:
    """One backend, one kind, in this fresh process: MEM_STEPS steps on the benchmark's batches;
    prints the resident memory before the first step (data, model and optimiser in place) and the
    peak during the steps (VmHWM reset just before them) as JSON."""
    b, kind = a.mem_child
    bench = Bench(Path(a.keep), a, kinds=(kind,))
    if kind == "pretrain":
        cfg = {**bench.cfg, "pretrain": {**bench.cfg["pretrain"], "sparse_backend": b}}
        learner, opt = P.build(cfg, bench.src)
        step = lambda s: bench.pretrain_step(learner, opt, bench.pre_batches[s], s)  # noqa: E731
        learner.train()
    else:
        torch.manual_seed(0)
        net = build_model(a.model, 3, NUM_CLASSES, backend=b).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        step = lambda s: bench.finetune_step(net, opt, bench.rooms[s % len(bench.rooms)])  # noqa: E731
    reset_peak()
    before = status_mb("VmRSS")
    for s in range(MEM_STEPS):
        step(s)
    peak = status_mb("VmHWM")
    print("MEM " + json.dumps({"backend": b, "kind": kind, "before": before, "peak": peak}))


def memory(a, wd: Path) -> list[dict]:
    rows = []
    for kind in ("pretrain", "finetune"):
        for b in BACKENDS:
            cmd = [sys.executable, __file__, "--keep", str(wd), "--mem-child", b, kind]
            cmd += ["--model", a.model, "--voxel", str(a.voxel), "--batch", str(a.batch)]
            cmd += ["--frames", str(a.frames), "--reps", str(a.reps), "--device", "cpu"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("MEM ")]
            if res.returncode != 0 or not line:
                raise SystemExit(f"{b} {kind} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
            rows.append(json.loads(line[-1][4:]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Res16UNet14A")
    ap.add_argument("--voxel", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=4, help="frames per pretraining step")
    ap.add_argument("--frames", type=int, default=8, help="frames per synthetic room")
    ap.add_argument("--reps", type=int, default=4, help="timed steps per backend and kind")
    ap.add_argument("--keep", default=None, help="workdir to keep (default: a temporary one)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--mem-child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(1)
    if a.mem_child:
        return mem_child(a)
    wd = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_backends_"))
    try:
        t = time.perf_counter()
        cfg = make_cfg(wd, a)
        for stage in ("frames", "teacher", "points"):
            S.run_stage(cfg, stage)
        bench = Bench(wd, a)
        print(f"stores and rooms ready in {time.perf_counter() - t:.1f} s")
        times, peaks = alternate(bench)
        cuda = bench.device.type == "cuda"
        mem = [] if cuda else memory(a, wd)
        pv = np.mean([len(b["coords"]) for b in bench.pre_batches])
        fv = np.mean([len(r[0]["coords"]) for r in bench.rooms])
        print(
            f"{a.model} at {a.voxel} m, {a.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
            f"pretraining: ppnce, {a.batch} frames per step, {pv:,.0f} voxels per batch; fine-tuning: one room, "
            f"{fv:,.0f} voxels; {a.reps} steps each, backends alternated"
        )
        if cuda:
            print("| step | backend | median s | min s | peak CUDA memory MiB |")
            print("|---|---|---|---|---|")
        else:
            print(
                "| step | backend | median s | min s | RSS before MiB | peak RSS in the steps MiB | peak - before MiB |"
            )
            print("|---|---|---|---|---|---|---|")
        for kind in ("pretrain", "finetune"):
            for b in bench.backends:
                ts = times[(b, kind)]
                head = f"| {kind} | {b} | {statistics.median(ts):.3f} | {min(ts):.3f} |"
                if cuda:
                    print(f"{head} {max(peaks[(b, kind)]):,.0f} |")
                    continue
                m = next(r for r in mem if r["backend"] == b and r["kind"] == kind)
                print(f"{head} {m['before']:,.0f} | {m['peak']:,.0f} | {m['peak'] - m['before']:,.0f} |")
        if len(bench.backends) < len(BACKENDS):
            print("minkowski: not on this device (MinkowskiEngine built without CUDA)")
            return
        for kind in ("pretrain", "finetune"):
            r = statistics.median(times[("spconv", kind)]) / statistics.median(times[("minkowski", kind)])
            print(f"{kind}: spconv / minkowski = {r:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
