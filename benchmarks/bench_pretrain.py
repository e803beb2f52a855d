"""Pretraining throughput: does the cache keep the trainer fed, and what does caching save?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pretrain.py [--scenes 1 --frames 16
        --depth 96 128 --steps 6 --batch 4 --voxel 0.05 --model Res16UNet14 --workers 0]

Builds tiny stores with the real stages (synthetic scenes -> frames -> teacher -> points) in a
temporary workdir, then prints:

- loader: frames/s the streaming loader (lift3d.train.data) delivers, collated and augmented,
  against the trainer's consumption (steps/s x batch size);
- cached step: one ppnce step fed by the loader (as lift3d.train.pretrain runs it) against the same
  3D step on batches already in memory: overhead % = cached / in-memory - 1;
- online: the in-memory step plus running the embedded 2D teacher (EfficientNet-Lite0) on the
  batch's frames, i.e. what training without the cache would cost: ratio online / cached.

Peak memory per batch size (instead of the above):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pretrain.py --batches 1 2 4 8 [--steps 6 ...]

runs ``--steps`` ppnce training steps fed by the loader (as the trainer runs them) for each batch
size in a fresh Python process, so the figures do not accumulate, and prints that process's
resident memory before the first step (imports, stores opened, model and optimiser built) and
its peak (the kernel's max RSS, ru_maxrss), plus the CUDA peak when the trainer runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.train import data as D
from lift3d.train import pretrain as P


def make_cfg(wd: Path, a) -> dict:
    cfg = C.defaults()
    cfg["workdir"] = str(wd)
    cfg["datasets"] = [
        {
            "name": "bench",
            "kind": "synthetic",
            "root": None,
            "frame_skip": 1,
            "split": "all",
            "scenes": a.scenes,
            "seed": 0,
            "frames_per_scene": a.frames,
            "depth_size": list(a.depth),
        }
    ]
    cfg["cluster"]["n_workers"] = 0
    cfg["teacher"].update({"device": "cpu", "batch_size": 8})
    cfg["pretrain"].update(
        {
            "model": a.model,
            "voxel_size": a.voxel,
            "batch_size": a.batch,
            "device": getattr(a, "device", "cpu"),
            "method": "ppnce",
            "num_workers": a.workers,
            "iterations": a.steps,
        }
    )
    return cfg


def rss_mb() -> float:
    """Current resident set size (VmRSS) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def mem_child(a) -> None:
    """One batch size in this (fresh) process: ``--steps`` loader-fed training steps; prints JSON."""
    cfg = make_cfg(Path(a.keep), a)
    p = cfg["pretrain"]
    dev = P.resolve_device(p.get("device"))
    src = D.open_sources(cfg)
    learner, opt = P.build(cfg, src)
    learner.to(dev).train()
    before = rss_mb()
    voxels = []
    for b in D.loader(cfg, src, start=0, stop=a.steps):
        opt.zero_grad(set_to_none=True)
        loss = P.compute_loss(learner, b, p, dev, int(b["step"]))
        loss.backward()
        opt.step()
        voxels.append(int(b["coords"].shape[0]))
    out = {
        "batch": a.batch,
        "voxels": float(np.mean(voxels)),
        "rss_before_mb": before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print("MEM " + json.dumps(out))


def peak_memory(a, wd: Path) -> None:
    """A fresh process per batch size (see the module docstring); a table of the results."""
    rows = []
    for bs in a.batches:
        cmd = [
            sys.executable,
            __file__,
            "--mem-child",
            "--keep",
            str(wd),
            "--batch",
            str(bs),
            "--scenes",
            str(a.scenes),
            "--frames",
            str(a.frames),
            "--depth",
            *map(str, a.depth),
            "--steps",
            str(a.steps),
            "--voxel",
            str(a.voxel),
            "--model",
            a.model,
            "--workers",
            str(a.workers),
            "--device",
            a.device,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("MEM ")]
        if res.returncode != 0 or not line:
            raise SystemExit(f"batch {bs} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][4:]))
    print(
        f"model {a.model}, voxel {a.voxel} m, {a.depth[0]}x{a.depth[1]} frames, {a.steps} ppnce steps per "
        f"batch size, one process each, device {a.device}, threads {torch.get_num_threads()}"
    )
    cuda = any("cuda_peak_mb" in r for r in rows)
    print("batch  voxels/batch  RSS before MiB  peak RSS MiB  peak - before MiB" + ("  CUDA peak MiB" if cuda else ""))
    for r in rows:
        print(
            f"{r['batch']:5d}  {r['voxels']:12.0f}  {r['rss_before_mb']:14.0f}  {r['peak_rss_mb']:12.0f}  "
            f"{r['peak_rss_mb'] - r['rss_before_mb']:17.0f}" + (f"  {r.get('cuda_peak_mb', 0):13.0f}" if cuda else "")
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16, help="frames per synthetic scene")
    ap.add_argument("--depth", type=int, nargs=2, default=[96, 128])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--voxel", type=float, default=0.05)
    ap.add_argument("--model", default="Res16UNet14")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--keep", default=None, help="workdir to keep (default: a temporary one)")
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="measure peak memory per batch size instead (a fresh process each)",
    )
    ap.add_argument("--device", default="cpu", help="trainer device for --batches (cpu | cuda)")
    ap.add_argument("--mem-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        return mem_child(a)
    wd = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    try:
        if a.batches:
            a.batch = max(a.batches)
        cfg = make_cfg(wd, a)
        t = time.perf_counter()
        for stage in ("frames", "teacher", "points"):
            S.run_stage(cfg, stage)
        print(
            f"stores built in {time.perf_counter() - t:.1f} s ({a.scenes * a.frames} frames {a.depth[0]}x{a.depth[1]})"
        )
        if a.batches:
            return peak_memory(a, wd)
        p, dev = cfg["pretrain"], torch.device("cpu")
        src = D.open_sources(cfg)

        # loader alone
        n_load = max(a.steps, 8)
        it = iter(D.loader(cfg, src, start=0, stop=n_load))
        next(it)  # worker start-up / first open left out
        t = time.perf_counter()
        batches = [b for b in it]
        load_s = time.perf_counter() - t
        loader_fps = len(batches) * a.batch / load_s
        voxels = np.mean([b["coords"].shape[0] for b in batches])

        learner, opt = P.build(cfg, src)
        learner.train()

        def step(batch, s):
            opt.zero_grad(set_to_none=True)
            loss = P.compute_loss(learner, batch, p, dev, s)
            loss.backward()
            opt.step()

        step(batches[0], 0)  # warm-up
        # in memory: the same batches, no I/O
        mem = batches[: a.steps]
        t = time.perf_counter()
        for s, b in enumerate(mem):
            step(b, s)
        mem_s = (time.perf_counter() - t) / len(mem)
        # cached: fed by the loader as the trainer is
        it = iter(D.loader(cfg, src, start=0, stop=1 + a.steps))  # the in-memory batches again
        b = next(it)
        step(b, int(b["step"]))  # worker start-up left out
        t = time.perf_counter()
        for b in it:
            step(b, int(b["step"]))
        cached_s = (time.perf_counter() - t) / a.steps
        # online: in-memory step + the 2D teacher on the batch's frames
        from lift3d.pipeline.teachers.registry import build_teacher

        teacher = build_teacher(cfg["teacher"]["name"], device="cpu")
        rgb = zarr.open_group(src[0].frames_path, mode="r")["rgb"]
        t = time.perf_counter()
        for s, b in enumerate(mem):
            frames = np.stack([rgb[i] for _, i in b["ids"]])
            with torch.inference_mode():
                teacher.forward(frames)
            step(b, s)
        online_s = (time.perf_counter() - t) / len(mem)

        consume = a.batch / cached_s
        print(
            f"model {a.model}, voxel {a.voxel} m, batch {a.batch}, {voxels:.0f} voxels/batch, "
            f"threads {torch.get_num_threads()}, loader workers {a.workers}"
        )
        print(f"loader            {loader_fps:8.1f} frames/s")
        print(
            f"trainer consumes  {consume:8.2f} frames/s ({1 / cached_s:.3f} steps/s x {a.batch}); "
            f"loader headroom x{loader_fps / consume:.1f}"
        )
        print(f"step in memory    {mem_s * 1e3:8.1f} ms")
        print(f"step from cache   {cached_s * 1e3:8.1f} ms  overhead {100 * (cached_s / mem_s - 1):+.1f} %")
        print(f"step online 2D    {online_s * 1e3:8.1f} ms  ratio online / cached x{online_s / cached_s:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
