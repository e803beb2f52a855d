"""The verdict's baselines and probes, on the same supervised vertices as fine-tuning.

- **Colour nearest neighbour**: each validation vertex takes the class of the supervised vertex
  whose colour (RGB, Euclidean) is nearest. It needs no network; when it beats a fine-tuned
  network, colour alone names the classes and the data cannot show what geometry adds.
- **Linear probe**: a frozen 3D network's per-voxel features (its output, computed once per room
  without augmentation; each vertex takes its voxel's), standardised with the supervised
  vertices' mean and deviation, and a linear softmax classifier fitted on the supervised vertices
  (full batch, Adam, weight decay); validation vertices are scored the same way. It measures what
  pretraining put into the features before fine-tuning can blur it, cheaply and with little
  variance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lift3d.core.metrics import confusion_matrix, segmentation_scores
from lift3d.nets.sparse import backend_of, sparse_input
from lift3d.train.scenes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, LabelledDataset

__all__ = ["colour_nn", "vertex_features", "linear_probe", "PROBE_STEPS"]

PROBE_STEPS = 300  # full-batch Adam steps of the linear probe
PROBE_LR = 0.01
PROBE_WEIGHT_DECAY = 1e-4


def _scores(ds: LabelledDataset, val: list[str], predict) -> dict:
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for name in val:
        s = ds.scene(name)
        conf += confusion_matrix(s.labels, predict(name), NUM_CLASSES, IGNORE_INDEX)
    return {**segmentation_scores(conf, CLASS_NAMES), "scenes": len(val)}


def colour_nn(ds: LabelledDataset, sup: dict[str, np.ndarray], val: list[str]) -> dict:
    """Scores of the 1-nearest-neighbour classifier on vertex colour fitted on ``sup``
    (scene -> supervised vertex indices)."""
    x = np.concatenate([ds.scene(n).rgb[v].astype(np.float64) for n, v in sup.items()])
    y = np.concatenate([ds.scene(n).labels[v] for n, v in sup.items()])
    if len(y) == 0:
        raise ValueError("colour_nn: no supervised vertex")
    x2 = (x**2).sum(1)

    def predict(name):
        q = ds.scene(name).rgb.astype(np.float64)
        out = np.empty(len(q), np.int64)
        for a in range(0, len(q), 4096):
            d = x2[None, :] - 2.0 * q[a : a + 4096] @ x.T  # + |q|^2, the same for every candidate
            out[a : a + 4096] = y[d.argmin(1)]
        return out

    return {**_scores(ds, val, predict), "supervised": int(len(y))}


@torch.no_grad()
def vertex_features(net, ds: LabelledDataset, name: str, voxel_size: float, device) -> np.ndarray:
    """(V, C) float32: the network's output feature of each vertex's voxel (no augmentation)."""
    from lift3d.train.finetune import voxelise  # the fine-tuning quantisation, exactly

    s = ds.scene(name)
    batch = voxelise([(s.xyz - s.xyz.mean(0, keepdims=True), s.rgb)], voxel_size)
    x = sparse_input(batch["feats"].to(device), batch["coords"].to(device), backend_of(net))
    was = net.training
    net.eval()
    try:
        out = net(x).F
    finally:
        net.train(was)
    return out.float().cpu()[batch["vertex_voxel"][0]].numpy()


def linear_probe(
    net, ds: LabelledDataset, sup: dict[str, np.ndarray], val: list[str], voxel_size: float, seed: int, device="cpu"
) -> dict:
    """Scores of a linear classifier on the frozen network's vertex features (module docstring)."""
    device = torch.device(device)
    feats = {n: vertex_features(net, ds, n, voxel_size, device) for n in list(sup) + list(val)}
    x = torch.from_numpy(np.concatenate([feats[n][v] for n, v in sup.items()]))
    y = torch.from_numpy(np.concatenate([ds.scene(n).labels[v] for n, v in sup.items()])).long()
    if len(y) == 0:
        raise ValueError("linear_probe: no supervised vertex")
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    g = torch.Generator().manual_seed(int(seed))
    w = (torch.randn(x.shape[1], NUM_CLASSES, generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(NUM_CLASSES, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    xs = (x - mean) / std
    for _ in range(PROBE_STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y)
        loss.backward()
        opt.step()
    with torch.no_grad():

        def predict(name):
            return (((torch.from_numpy(feats[name]) - mean) / std) @ w + b).argmax(1).numpy()

        res = _scores(ds, val, predict)
    return {**res, "supervised": int(len(y)), "train_loss": float(loss.detach()), "channels": int(x.shape[1])}
