"""3D-to-2D distillation: the extra inference cost of the distilled 2D network over the baseline.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distill2d.py [--sizes 120x160 240x320 480x640
        --channels-3d 96 256 --head-dim 128 --frames 20 --threads 1]

Both networks are the ones ``lift3d run distill2d`` trains (lift3d.nets.pspnet.Seg2D on the embedded
EfficientNet-Lite0, output stride 16, pyramid pooling): the baseline, and the distilled network
with the simulated-3D branch (DN1 to C3D channels, DN2, the wider classifier). C3D is the frozen 3D
network's decoder width: 96 for Res16UNet34C (the paper preset) and Res16UNet14A (the demo), 256 for Res16UNet14.
Timed: one frame at a time (batch 1), eval mode, no gradients, the logits upsampled to the frame
and arg-maxed, as the stage's evaluation runs; median of ``--frames`` calls after 3 warm-up calls.
The weights are the ImageNet backbone plus freshly initialised heads: the cost does not depend on
what was learned.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lift3d.nets.backbones2d import efficientnet_lite0
from lift3d.nets.pspnet import Seg2D


def per_frame_ms(net, h: int, w: int, frames: int) -> float:
    x = torch.rand(1, 3, h, w) * 255
    times = []
    with torch.no_grad():
        for i in range(frames + 3):
            t = time.perf_counter()
            F.interpolate(net(x)["logits"], size=(h, w), mode="bilinear", align_corners=False).argmax(1)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["120x160", "240x320", "480x640"])
    ap.add_argument("--channels-3d", nargs="+", type=int, default=[96, 256])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    nets = {"baseline": Seg2D(efficientnet_lite0(), 20, a.head_dim).eval()}
    for c in a.channels_3d:
        nets[f"distilled C3D={c}"] = Seg2D(
            efficientnet_lite0(), 20, a.head_dim, c, torch.zeros(c), torch.ones(c)
        ).eval()
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 1, median of {a.frames} frames")
    print(f"{'network':<22} {'params':>10}  " + "  ".join(f"{s + ' ms':>14}" for s in a.sizes))
    base = {}
    for k, net in nets.items():
        cells = []
        for s in a.sizes:
            h, w = (int(v) for v in s.split("x"))
            ms = per_frame_ms(net, h, w, a.frames)
            if k == "baseline":
                base[s] = ms
                cells.append(f"{ms:14.1f}")
            else:
                cells.append(f"{ms:6.1f} ({100 * (ms / base[s] - 1):+4.0f}%)")
        print(f"{k:<22} {params[k]:>10,}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
