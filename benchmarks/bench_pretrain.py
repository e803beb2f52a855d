"""Pretraining throughput: does the cache keep the trainer fed, and what does caching save?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pretrain.py [--scenes 1 --frames 16
        --depth 96 128 --steps 6 --batch 4 --voxel 0.05 --model Res16UNet14 --workers 0]

Builds tiny stores with the real stages (synthetic scenes -> frames -> teacher -> points) in a
temporary workdir, then prints:

- loader: frames/s the streaming loader (lift3d.train.data) delivers, collated and augmented,
  against the trainer's consumption (steps/s x batch size);
- cached step: one ppnce step fed by the loader (as lift3d.train.pretrain runs it) against the same
  3D step on batches already in memory: overhead % = cached / in-memory - 1 (the variants alternate
  step by step on the same batches);
- online: the in-memory step plus running the embedded 2D teacher (EfficientNet-Lite0) on the
  batch's frames, i.e. what training without the cache would cost: ratio online / cached;
- projected online at ``--project-size`` (default 480x640, ScanNet's depth grid): the 2D forward
  (features and dense logits, as the teacher stage runs it) of EfficientNet-Lite0 and of ResNet-50
  timed on one frame of that size, and the ratio (in-memory step + batch x forward) / cached step;
  the 3D step stays the one measured here, at the bench's frame size.

``--sparse-backend spconv`` runs the 3D network on spconv instead of MinkowskiEngine.

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
            "sparse_backend": getattr(a, "sparse_backend", "minkowski"),
        }
    )
    return cfg


def forward_seconds(net: torch.nn.Module, hw, reps: int = 2) -> float:
    """Seconds of one 2D forward (features and dense logits) on one frame of size ``hw``."""
    x = torch.randn(1, 3, int(hw[0]), int(hw[1]))
    with torch.inference_mode():
        net(x)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            net(x)
    return (time.perf_counter() - t) / reps


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
            "--sparse-backend",
            a.sparse_backend,
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
    ap.add_argument("--sparse-backend", default="minkowski", help="the 3D network's library: minkowski | spconv")
    ap.add_argument(
        "--project-size", type=int, nargs=2, default=[480, 640], help="frame size of the projected online ratios"
    )
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
        # The three variants alternate step by step on the same batches, so that drift and other load
        # on the machine hit them alike: cached (fed by the loader as the trainer is), in memory (the
        # batch already collated, no I/O), online (in memory plus the 2D teacher on the batch's frames).
        from lift3d.pipeline.teachers.registry import build_teacher

        teacher = build_teacher(cfg["teacher"]["name"], device="cpu")
        rgb = zarr.open_group(src[0].frames_path, mode="r")["rgb"]
        mem = batches[: a.steps]
        it = iter(D.loader(cfg, src, start=0, stop=1 + a.steps))  # the in-memory batches again
        b = next(it)
        step(b, int(b["step"]))  # worker start-up left out
        cached_t, mem_t, online_t = [], [], []
        for s, m in enumerate(mem):
            t = time.perf_counter()
            b = next(it)
            step(b, int(b["step"]))
            cached_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            step(m, s)
            mem_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            frames = np.stack([rgb[i] for _, i in m["ids"]])
            with torch.inference_mode():
                teacher.forward(frames)
            step(m, s)
            online_t.append(time.perf_counter() - t)
        cached_s, mem_s, online_s = (float(np.mean(x)) for x in (cached_t, mem_t, online_t))

        # projected: the 2D forward at --project-size, per frame, for both teachers' backbones
        from lift3d.nets.backbones2d import efficientnet_lite0, resnet50

        proj = {
            "EfficientNet-Lite0": forward_seconds(efficientnet_lite0(pretrained=False), a.project_size),
            "ResNet-50": forward_seconds(resnet50(None, pretrained=False), a.project_size),
        }

        consume = a.batch / cached_s
        print(
            f"model {a.model} ({a.sparse_backend}), voxel {a.voxel} m, batch {a.batch}, {voxels:.0f} voxels/batch, "
            f"frames {a.depth[0]}x{a.depth[1]}, threads {torch.get_num_threads()}, loader workers {a.workers}"
        )
        print(f"loader            {loader_fps:8.1f} frames/s")
        print(
            f"trainer consumes  {consume:8.2f} frames/s ({1 / cached_s:.3f} steps/s x {a.batch}); "
            f"loader headroom x{loader_fps / consume:.1f}"
        )
        print(f"step in memory    {mem_s * 1e3:8.1f} ms")
        print(f"step from cache   {cached_s * 1e3:8.1f} ms  overhead {100 * (cached_s / mem_s - 1):+.1f} %")
        print(f"step online 2D    {online_s * 1e3:8.1f} ms  ratio online / cached x{online_s / cached_s:.2f}")
        h, w = a.project_size
        for name, fwd in proj.items():
            online = mem_s + a.batch * fwd
            print(
                f"projected {h}x{w} {name}: forward {fwd * 1e3:.0f} ms/frame, online step {online * 1e3:.0f} ms, "
                f"ratio online / cached x{online / cached_s:.1f}"
            )
    finally:
        if not a.keep:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
