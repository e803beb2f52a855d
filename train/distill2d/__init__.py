"""Stage ``distill2d``: 3D-to-2D distillation (Liu, Qi, Fu, CVPR 2021). A 2D segmentation network
learns, from RGB alone, to simulate the features of a frozen 3D network, and segments better with
them; at test time it needs no depth and no points.

1. Paired 3D features in image space (once per 3D checkpoint, cached). For each training scene the
   frozen 3D network (``distill2d.checkpoint``; null = the fine-tuned network of this config) runs
   on the labelled mesh vertices (``<root>/scans/<scene>/<scene>_vh_clean_2.ply``, the ``.sens``
   pose frame), voxelised at the checkpoint's voxel size; a vertex takes its voxel's penultimate
   (block8, ``decoder_dim`` channels) feature through MinkowskiEngine's ``sparse_quantize``
   inverse map. The vertices are projected into every kept frame of ``frames.zarr/<dataset>`` with
   its intrinsics and camera-to-world pose (OpenCV camera; (row, col) with integer coordinates at
   pixel centres, the nearest pixel centre taken); a point counts only where the frame measured a
   depth with |z - depth| < ``depth_tolerance`` (so occluded points do not leak through), and
   among those the nearest point per pixel wins. The covered pixels of each frame are cached,
   ragged, in ``<workdir>/runs/distill2d/features3d-<id>.zarr/<dataset>/`` (``feats`` float16
   (P, C), ``pixel`` int32 (P, 2), ``label3d`` uint8 (P,) = the point's ScanNet-20 class or 255,
   ``frame_index`` int64 (N,) = the frames.zarr row, ``offsets`` int64 (N + 1)), written per scene
   and committed like the other stores, so a killed run redoes at most the scenes not done and 2D
   training never runs the 3D network again.
2. Two 2D networks on the training frames (scenes of the evaluation split are never trained on),
   same seed, data order and schedule: the baseline (PSPNet-style, no 3D branch) and the distilled
   network (with the simulated-3D branch, DN1 / DN2, the L2 loss on covered pixels and, for the
   ``unpaired_fraction`` of frames treated as having no 3D data, the semantic-aware adversarial
   loss); see :mod:`lift3d.nets.pspnet`.
3. Evaluation: ScanNet-20 2D mIoU of both on the held-out frames (``eval_split``, read directly
   with the dataset's reader: frames.zarr holds only the training split) against the ground-truth
   2D label images, and the measured inference time of both.

Run folder ``<workdir>/runs/distill2d/<run_name>/``: ``run.json``, ``metrics.csv``,
``checkpoint.pt`` (latest, atomic; resumable), ``baseline.pt``, ``model.pt`` (the distilled 2D
network), ``eval.json``.
"""

from lift3d.core.errors import DistillError
from lift3d.pipeline.readers.common import to_grid
from lift3d.pipeline.readers.scannet_labels import default_labels
from lift3d.train.distill2d.cache import (
    build_cache,
    load_3d,
    open_sources,
    project_points,
    resolve_checkpoint,
    vertex_features,
)
from lift3d.train.distill2d.data import TrainData
from lift3d.train.distill2d.train import (
    discriminator_step,
    evaluate,
    generator_step,
    identity,
    make_optimizer,
    run,
    run_dir,
    status,
    summary,
    train,
)

__all__ = [
    "run",
    "status",
    "train",
    "run_dir",
    "identity",
    "summary",
    "project_points",
    "vertex_features",
    "load_3d",
    "resolve_checkpoint",
    "TrainData",
    "generator_step",
    "discriminator_step",
    "evaluate",
    "DistillError",
    "build_cache",
    "open_sources",
    "make_optimizer",
    "default_labels",
    "to_grid",
]
