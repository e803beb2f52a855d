"""lift3d.pipeline.teachers.registry (the registry, shapes, soft labels) and lift3d.core.classmaps."""

import hashlib
import json
import math
import sys

import numpy as np
import pytest
import torch

from lift3d.core import classmaps as cm
from lift3d.pipeline.teachers import registry as T

CATS = {281, 282, 283, 284, 285}


@pytest.fixture(scope="module")
def lite0():
    return T.build_teacher("efficientnet_lite0", input_size=(120, 160))


def test_registry():
    assert T.available_teachers() == ["efficientnet_lite0", "fitted", "hf_segmentation", "resnet50"]
    assert T.DEFAULT_TEACHER == "efficientnet_lite0"
    with pytest.raises(KeyError, match="available"):
        T.build_teacher("vgg16")


def test_lite0_shapes_stride_and_soft_labels(lite0):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)  # stored size != input size
    feats, probs = lite0.forward(frames)
    assert lite0.input_size == (120, 160) and lite0.stride == lite0.label_stride == 32
    assert feats.shape == (2, 320, 4, 5) and feats.dtype == torch.float32
    assert probs.shape == (2, 1000, 4, 5)
    assert lite0.output_shapes() == ((320, 4, 5), (1000, 4, 5))
    assert lite0.channels == 320 and len(lite0.classes) == 1000
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 4, 5))
    assert float(probs.min()) >= 0
    # float NCHW input (already preprocessed) gives the same answer
    f2, p2 = lite0.forward(lite0.preprocess(frames))
    torch.testing.assert_close(f2, feats)
    torch.testing.assert_close(p2, probs)


def test_output_size_is_ceil_of_stride():
    t = T.build_teacher("efficientnet_lite0", input_size=(100, 150))
    (c, h, w), (k, hs, ws) = t.output_shapes()
    assert (h, w) == (math.ceil(100 / 32), math.ceil(150 / 32)) == (hs, ws)


def test_preprocess(lite0):
    grey = np.full((1, 60, 80, 3), 255 // 2, dtype=np.uint8)
    x = lite0.preprocess(grey)
    assert x.shape == (1, 3, 120, 160) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (127 / 255 - 0.5) / 0.5))
    # a frame at the input size is only normalised
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 120, 160, 3), dtype=np.uint8)
    ref = (torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(lite0.preprocess(img), ref)
    with pytest.raises(ValueError, match="uint8"):
        lite0.preprocess(img.astype(np.float32))
    with pytest.raises(ValueError, match="forward wants"):
        lite0.forward(torch.zeros(1, 4, 8, 8))


def test_lite0_soft_labels_see_a_cat():
    skd = pytest.importorskip("skimage.data")
    t = T.build_teacher("efficientnet_lite0", input_size=(224, 320))
    img = skd.chelsea()[None]  # 300 x 451, whole frame
    feats, probs = t.forward(img)
    assert probs.shape == (1, 1000, 7, 10)
    assert int(probs.mean((2, 3)).argmax()) in CATS


def test_top_k(lite0):
    rng = np.random.default_rng(2)
    _, probs = lite0.forward(rng.integers(0, 256, (1, 120, 160, 3), dtype=np.uint8))
    p, i = T.top_k(probs, 5)
    assert p.dtype == np.float16 and i.dtype == np.uint16 and p.shape == (1, 5, 4, 5)
    assert np.all(np.diff(p.astype(np.float32), axis=1) <= 0)  # most probable first
    np.testing.assert_array_equal(i[:, 0], probs.argmax(1).numpy())
    np.testing.assert_allclose(p[:, 0], probs.amax(1).numpy(), rtol=1e-3)


def test_attrs_json(lite0):
    a = lite0.attrs()
    json.dumps(a)
    assert a["teacher"] == "efficientnet_lite0" and a["stride"] == 32
    assert a["input_size"] == [120, 160] and a["mean"] == [0.5, 0.5, 0.5]
    assert a["classes"][281] == "tabby" and len(a["weights_sha256"]) == 64


def test_resnet50_teacher(tmp_path):
    import torchvision

    path = tmp_path / "rn50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    t = T.build_teacher("resnet50", weights=str(path), input_size=(64, 96))
    feats, probs = t.forward(np.zeros((2, 48, 64, 3), np.uint8))
    assert feats.shape == (2, 2048, 2, 3) and probs.shape == (2, 1000, 2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 2, 3))
    assert t.stride == 32 and t.mean == (0.485, 0.456, 0.406)
    assert t.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        T.build_teacher("resnet50")


def test_hf_errors_without_transformers(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        T.build_teacher("hf_segmentation")
    with pytest.raises(FileNotFoundError, match="config.json"):
        T.build_teacher("hf_segmentation", weights=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        T.build_teacher("hf_segmentation", weights=tmp_path)


def test_hf_segformer_tiny(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (optional: pip install transformers)"
    )
    cfg = transformers.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=150,
        id2label=dict(enumerate(cm.ade20k150_names())),
        label2id={n: i for i, n in enumerate(cm.ade20k150_names())},
    )
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg)
    model.save_pretrained(tmp_path)
    t = T.build_teacher("hf_segmentation", weights=str(tmp_path), input_size=(64, 96))
    feats, probs = t.forward(np.zeros((2, 48, 64, 3), np.uint8))
    assert feats.shape == (2, 32, 2, 3) and t.stride == 32 and t.channels == 32
    assert probs.shape == (2, 150, 16, 24) and t.label_stride == 4
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 24))
    assert t.classes == cm.ade20k150_names()
    assert cm.teacher_to_nyu40(t.classes)[0] == 1  # wall
    assert len(t.weights_sha256) == 64


# ----------------------------------------------------------------------------- class maps


def test_nyu40_and_scannet20():
    names = cm.nyu40_names()
    assert len(names) == 40 and names[0] == "wall" and names[39] == "otherprop"
    lut = cm.nyu40_to_scannet20(ignore_index=-100)
    kept = [i for i in range(41) if lut[i] != -100]
    assert kept == list(cm.SCANNET20_NYU40_IDS)
    assert kept == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
    assert sorted(lut[kept]) == list(range(20)) and lut[0] == -100
    assert cm.scannet20_names() == [
        "wall",
        "floor",
        "cabinet",
        "bed",
        "chair",
        "sofa",
        "table",
        "door",
        "window",
        "bookshelf",
        "picture",
        "counter",
        "desk",
        "curtain",
        "refrigerator",
        "shower curtain",
        "toilet",
        "sink",
        "bathtub",
        "otherfurniture",
    ]


def test_ade20k_map():
    names = cm.ade20k150_names()
    assert len(names) == 150 == len(set(names))
    assert names[:4] == ["wall", "building", "sky", "floor"] and names[-1] == "flag"
    lut = cm.ade20k150_to_nyu40()
    assert lut.shape == (150,) and lut.min() >= 0 and lut.max() <= 40
    nyu = dict(zip(names, lut))
    assert (nyu["wall"], nyu["floor"], nyu["ceiling"], nyu["bed"], nyu["toilet"]) == (1, 2, 22, 4, 33)
    assert nyu["sky"] == nyu["car"] == 0
    # every ScanNet-20 class but shower curtain has an ADE20K counterpart
    assert set(cm.SCANNET20_NYU40_IDS) - set(lut.tolist()) == {28}


def test_imagenet_map_names_match_timm():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    rows = cm.load_table("imagenet_to_nyu40.csv")
    for r in rows:  # names checked against an independent list
        assert info.index_to_description(int(r["imagenet_index"])).split(",")[0] == r["imagenet_name"]
    lut = cm.imagenet_to_nyu40()
    assert lut.shape == (1000,) and lut.max() <= 40 and (lut > 0).sum() == len(rows)
    assert lut[831] == 6 and lut[532] == 7 and lut[453] == 10 and lut[564] == 4  # couch, table,
    assert lut[281] == 0  # bookcase, bed


def test_teacher_to_scannet20(lite0):
    lut = cm.teacher_to_scannet20(lite0.classes)
    assert lut.shape == (1000,) and lut[831] == 5 and lut[281] == cm.IGNORE_INDEX == 255  # sofa; cat ignored
    with pytest.raises(ValueError, match="no NYU40 mapping"):
        cm.teacher_to_nyu40(["a", "b"])
    with pytest.raises(ValueError, match="ADE20K"):
        cm.teacher_to_nyu40([f"c{i}" for i in range(150)])
