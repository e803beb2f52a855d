"""The hf_segmentation teacher on tiny, randomly initialised SegFormer and DPT models built from
their configs and saved inside the test (nothing is downloaded): its probabilities against the
model run directly through transformers, the ADE20K -> ScanNet-20 folding, and bad folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is pinned in requirements/")

from lift3d.core.classmaps import ade20k150_names  # noqa: E402
from lift3d.core.errors import TeacherError  # noqa: E402
from lift3d.pipeline.teachers.registry import build_teacher  # noqa: E402

torch.set_num_threads(1)

ID2LABEL = {i: n for i, n in enumerate(ade20k150_names())}


def labels() -> dict:
    return {"num_labels": 150, "id2label": ID2LABEL, "label2id": {n: i for i, n in ID2LABEL.items()}}


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        **labels(),
    )
    folder = tmp_path_factory.mktemp("segformer")
    transformers.SegformerForSemanticSegmentation(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        use_auxiliary_head=False,
        **labels(),
    )
    folder = tmp_path_factory.mktemp("dpt")
    transformers.DPTForSemanticSegmentation(cfg).eval().save_pretrained(folder)
    return folder


def scannet20_of_ade() -> list[int]:
    """ADE20K index -> ScanNet-20 index (20 = other), read from the shipped tables by hand."""
    from importlib import resources

    data = resources.files("lift3d").joinpath("data")
    nyu = {int(r["ade_index"]): int(r["nyu40_id"]) for r in csv.DictReader(open(data / "ade20k150_to_nyu40.csv"))}
    s20 = {int(r["nyu40_id"]): int(r["scannet20_index"]) for r in csv.DictReader(open(data / "nyu40_scannet20.csv"))}
    return [s20.get(nyu[a], -1) if s20.get(nyu[a], -1) >= 0 else 20 for a in range(150)]


def frames(h, w, n=2):
    return np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("which,size", [("segformer", (64, 96)), ("dpt", (64, 64))])
def test_folded_probabilities_match_the_model_run_directly(request, which, size):
    folder = request.getfixturevalue(which)
    t = build_teacher("hf_segmentation", weights=str(folder), input_size=size, class_map="ade20k_scannet20")
    x = frames(48, 64)
    feats, probs = t(x)
    assert t.classes[-1] == "other" and t.ignore_class == 20 and len(t.classes) == 21
    # the same model through transformers, its softmax folded by the table read above
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(pixel_values=t.preprocess(x)).logits
    if logits.shape[-2] > -(-size[0] // 4):  # DPT's full-resolution head, averaged to stride 4
        logits = torch.nn.functional.adaptive_avg_pool2d(logits, (-(-size[0] // 4), -(-size[1] // 4)))
    p = torch.softmax(logits, 1)
    want = torch.zeros(p.shape[0], 21, *p.shape[2:])
    for a, c in enumerate(scannet20_of_ade()):
        want[:, c] += p[:, a]
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)
    assert feats.dim() == 4 and feats.shape[0] == 2


def test_without_class_map_the_150_classes_stay(segformer):
    t = build_teacher("hf_segmentation", weights=str(segformer), input_size=(64, 96))
    _, probs = t(frames(48, 64, 1))
    assert probs.shape[1] == 150 and t.classes == ade20k150_names() and t.ignore_class is None
    assert t.label_stride == 4 and t.stride == 8


def test_folder_without_id2label_is_refused(segformer, tmp_path):
    bad = tmp_path / "noid"
    bad.mkdir()
    cfg = json.loads((segformer / "config.json").read_text())
    cfg.pop("id2label")
    cfg.pop("label2id")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError, match=r"noid/config.json has no id2label"):
        build_teacher("hf_segmentation", weights=str(bad), input_size=(64, 96))


def test_dpt_needs_a_square_input(dpt):
    with pytest.raises(TeacherError, match="square"):
        build_teacher("hf_segmentation", weights=str(dpt), input_size=(64, 96))
    t = build_teacher("hf_segmentation", weights=str(dpt))
    assert t.input_size == (64, 64)  # its config's image_size


def test_class_map_only_for_hf_teachers():
    with pytest.raises(TeacherError, match="class_map"):
        build_teacher("efficientnet_lite0", class_map="ade20k_scannet20")
