"""The teacher cache's channel reduction (``teacher.pca_channels``): bytes, reconstruction error
and the effect on the pretraining loss, against the exact float16 cache.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_teacher_pca.py [--channels 80 20 --steps 100 --seeds 0 1 2]

On the embedded synthetic dataset (the demo's training scenes), this runs frames, teacher and
points once, then for the exact cache and each ``--channels`` value: the teacher stage (the
projection fitted on ``--fit-frames`` frames spread over the dataset, so most frames it is
measured on were not in the fit) and ``ppnce`` pretraining for ``--steps`` steps with the same
seed. It prints the stored feature bytes per frame, the residual energy over all frames, and
the pretraining loss (mean of the last 10 steps, per seed), then projects the ResNet-50 layer4 cache for
ScanNet's ~100k frames. ``--teacher resnet50 --weights PATH`` measures ResNet-50 itself.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.launch import tune_script

SCANNET_FRAMES = 100_000


def pretrain_loss(cfg: dict, seeds: list[int]) -> tuple[list[float], float]:
    """(per seed: the mean loss of the last 10 steps; seconds per run) of ppnce runs."""
    from lift3d.train.pretrain import run_dir

    out, t0 = [], time.perf_counter()
    for seed in seeds:
        c = {**cfg, "pretrain": {**cfg["pretrain"], "seed": seed}}
        S.run_stage(c, "pretrain")
        with open(run_dir(c) / "metrics.csv") as fh:
            losses = [float(r["loss"]) for r in csv.DictReader(fh)]
        out.append(float(np.mean(losses[-10:])))
    return out, (time.perf_counter() - t0) / len(seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[80, 20])
    ap.add_argument("--fit-frames", type=int, default=21, help="half the demo's 42 training frames")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds per cache")
    ap.add_argument("--input", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    ap.add_argument("--teacher", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pca_", dir=args.tmp))
    try:

        def cfg_for(name: str, channels: int | None) -> dict:
            return C.load(
                None,
                [
                    f"workdir={tmp / name}",
                    "cluster.n_workers=0",
                    f"teacher.name={args.teacher}",
                    f"teacher.input_size=[{args.input[0]}, {args.input[1]}]",
                    f"teacher.pca_channels={channels if channels else 'null'}",
                    f"teacher.pca_fit_frames={args.fit_frames}",
                    "pretrain.method=ppnce",
                    f"pretrain.iterations={args.steps}",
                    "pretrain.checkpoint_every=1000",
                ]
                + ([f"teacher.weights={args.weights}"] if args.weights else []),
            )

        exact = cfg_for("exact", None)
        for stage in ("frames", "teacher", "points"):
            S.run_stage(exact, stage)
        rows = []
        for channels in [None, *args.channels]:
            cfg = exact if channels is None else cfg_for(f"pca{channels}", channels)
            if channels is not None:  # the same frames and points; only the teacher cache differs
                for store in ("frames.zarr", "points.zarr"):
                    shutil.copytree(tmp / "exact" / store, tmp / f"pca{channels}" / store)
                S.run_stage(cfg, "teacher")
            g = zarr.open_group(
                str(
                    tmp
                    / ("exact" if channels is None else f"pca{channels}")
                    / "teacher.zarr"
                    / S.groups(cfg, "teacher")[0].path
                ),
                mode="r",
            )
            red = g.attrs.get("features_reduction") or {}
            loss, secs = pretrain_loss(cfg, args.seeds)
            rows.append(
                {
                    "channels": g.attrs["features_shape"][0],
                    "bytes": g.attrs["bytes_per_frame"]["features"],
                    "stored": sum(
                        f.stat().st_size for f in (Path(g.store.root) / g.path / "features").rglob("*") if f.is_file()
                    )
                    / g["features"].shape[0],
                    "rel": red.get("relative_error"),
                    "unexpl": red.get("unexplained_variance"),
                    "fit": red.get("explained_variance_fit"),
                    "loss": loss,
                    "secs": secs,
                    "frames": g["features"].shape[0],
                    "shape": g.attrs["features_shape"],
                }
            )
        c_in = rows[0]["channels"]
        print(
            f"teacher {args.teacher} at {args.input[0]}x{args.input[1]}, features {rows[0]['shape']} per frame, "
            f"{rows[0]['frames']} frames; projection fitted on {args.fit_frames} of them; ppnce {args.steps} steps, "
            f"seeds {args.seeds}, 1 thread"
        )
        print(
            f"{'channels':>9} {'raw B/frame':>12} {'stored B/frame':>15} {'residual/energy':>16} "
            f"{'unexplained var':>16} {'fit var kept':>13} {'ppnce loss, mean ± sd':>22} {'s/run':>6}  per seed"
        )
        for r in rows:

            def pct(v):
                return "-" if v is None else f"{100 * v:.2f} %"

            print(
                f"{r['channels']:>9} {r['bytes']:>12,} {r['stored']:>15,.0f} {pct(r['rel']):>16} "
                f"{pct(r['unexpl']):>16} {pct(r['fit']):>13} {np.mean(r['loss']):>13.3f} ± {np.std(r['loss']):5.3f} "
                f"{r['secs']:>6.0f}  {' '.join(f'{v:.3f}' for v in r['loss'])}"
            )
        print(f"ResNet-50 layer4 (2048 x 15 x 20 at 480x640) for ScanNet's ~{SCANNET_FRAMES:,} frames, raw float16:")
        for k in (2048, 768, 512, 256):
            b = k * 15 * 20 * 2
            print(
                f"  {k:5d} channels ({2048 / k:4.1f}x fewer, as {c_in} -> {max(1, round(c_in * k / 2048))} here): "
                f"{b:>9,} B/frame -> {b * SCANNET_FRAMES / 1e9:6.1f} GB"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    tune_script()  # the malloc settings the lift3d command runs with (lift3d.launch)
    main()
