"""Every config in configs/ (yacs and LazyConfig) loads, builds on CPU and runs one step; the COCO
recipes state the papers' published COCO results and hyper-parameters.

Nothing is downloaded: student inits are dropped (MODEL.WEIGHTS / train.init_checkpoint are never
loaded here), teachers keep random weights ("random") and are shrunk through their own override
mechanism (MODEL.DISTILL.TEACHER.OPTS, the lazy ``opts``); students keep their real architecture.
"""
import glob
import importlib.util
import os
import re
from collections import OrderedDict

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage

from pkd.config import get_distill_cfg
from pkd.solver import build_optimizer
from pkd.meta_arch import DistillMetaArch

from pkd_testing import CONFIGS, make_batch


HAS_DETECTRON2_C = importlib.util.find_spec("detectron2._C") is not None

R50_IMAGENET = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
IMAGENET_RGB = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])

# The papers' COCO results (README, "The published COCO recipes"): config -> (teacher AP,
# baseline AP, KD AP); "n/a" where the paper gives no teacher AP.
PUBLISHED = {
    "PKD-RetinaNet-R50-SwinS-MaskRCNN-2x": ("48.2", "37.4", "41.5"),
    "PKD-FCOS-R50-SwinS-MaskRCNN-2x": ("n/a", "39.1", "43.9"),
    "PKD-RetinaNet-R50-X101-FCOS-1x": ("42.6", "36.5", "40.3"),
    "PKD-FasterRCNN-R50-R101-FasterRCNN-2x": ("39.8", "38.4", "40.4"),
    "PKD-RetinaNet-R50-X101-RetinaNet-2x": ("41.0", "37.4", "40.8"),
    "FGD-RetinaNet-R50-X101-RetinaNet-2x": ("41.0", "37.4", "40.7"),
    "FGD-FasterRCNN-R50-X101DCN-CascadeMaskRCNN-2x": ("47.3", "38.4", "42.0"),
    "PGD-FCOS-R50-R101-FCOS3x-1x": ("43.1", "38.2", "42.5"),
    "RM-PFI-RetinaNet-R50-X101-RetinaNet-2x": ("n/a", "36.9", "40.4"),
}
# The two headline configs wrap COCO ones.
HEADLINES = {
    "PKD-RetinaNet-R50": "PKD-RetinaNet-R50-SwinS-MaskRCNN-2x",
    "PKD-FCOS-R50": "PKD-FCOS-R50-SwinS-MaskRCNN-2x",
}

# Teachers shrunk for CPU, same kind: Swin with 2 blocks per stage and 32 channels; ResNe(X)t
# bottleneck trunks of depth 50 and narrow groups (groups and deformable convs kept).
_TINY_SWIN = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}


def _tiny_resnet(width_per_group, *opts):
    return ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
            "MODEL.RESNETS.WIDTH_PER_GROUP", str(width_per_group), *opts]


TINY_TEACHER_OPTS = {
    "MaskRCNN-SwinS-FPN-3x.yaml": [x for k, v in _TINY_SWIN.items()
                                   for x in (f"MODEL.SWIN.{k.upper()}", str(v))],
    "MaskRCNN-SwinS-FPN-3x.py": [
        f"model.backbone.bottom_up.{k}={v}" for k, v in _TINY_SWIN.items()
    ],
    "RetinaNet-X101-64x4d-1x.yaml": _tiny_resnet(1),
    "FCOS-X101-64x4d-2x.yaml": _tiny_resnet(1),
    # Deformable convs need detectron2._C, which the pure-Python install lacks: build without.
    "CascadeMaskRCNN-X101-32x4d-DCN-1x.yaml": _tiny_resnet(2) if HAS_DETECTRON2_C else _tiny_resnet(
        2, "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, False]"
    ),
    "FasterRCNN-R101-FPN-2x.yaml": _tiny_resnet(16),
    "FCOS-R101-3x.yaml": _tiny_resnet(16),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: as fast for these tiny inputs, and no 10-20x stall when another process
    holds one of the 2 cores (OpenMP's threads spin-wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(path):
    return os.path.relpath(path, CONFIGS)


def _all_configs():
    paths = glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    paths += glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True)
    # configs/COCO/common/ holds LazyConfig fragments imported by the configs, not configs.
    return sorted(_rel(p) for p in paths if f"{os.sep}common{os.sep}" not in p)


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


ALL_CONFIGS = _all_configs()
RECIPES = [c for c in ALL_CONFIGS if _stem(c) in set(PUBLISHED) | set(HEADLINES)]



def _load_yacs(path):
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _load_lazy(path):
    cfg = LazyConfig.load(os.path.join(CONFIGS, path))
    if "train" in cfg:
        cfg.train.device = "cpu"
        cfg.train.init_checkpoint = ""
    return cfg


def _is_teacher(path):
    return path.startswith("teachers" + os.sep)


def tiny_yacs_opts(path):
    """Trailing ``KEY VALUE`` overrides that make the yacs config ``path`` (relative to configs/)
    build fast on CPU with nothing to download: no student init, a shrunk teacher config, and a
    shrunk, random-weights teacher for distillation configs."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    if _is_teacher(path):
        opts += TINY_TEACHER_OPTS[os.path.basename(path)]
    cfg = _load_yacs(path)
    if cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
        teacher = cfg.MODEL.DISTILL.TEACHER
        teacher_opts = list(teacher.OPTS) + TINY_TEACHER_OPTS.get(
            os.path.basename(teacher.CONFIG), []
        )
        opts += ["MODEL.DISTILL.TEACHER.WEIGHTS", "random",
                 "MODEL.DISTILL.TEACHER.OPTS", repr(teacher_opts)]
    return opts


def _build(path):
    """The model of a config, shrunk where it is a teacher or has one; random weights."""
    torch.manual_seed(0)
    if path.endswith(".yaml"):
        cfg = _load_yacs(path)
        cfg.merge_from_list(tiny_yacs_opts(path))
        return build_model(cfg)
    cfg = _load_lazy(path)
    if _is_teacher(path):
        cfg = LazyConfig.apply_overrides(cfg, TINY_TEACHER_OPTS[os.path.basename(path)])
    teacher = cfg.model.get("teacher")
    if teacher is not None:
        teacher.weights = "random"
        teacher.opts = list(teacher.get("opts") or []) + TINY_TEACHER_OPTS.get(
            os.path.basename(teacher.config), []
        )
    return instantiate(cfg.model)


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_config_builds_and_runs(path):
    model = _build(path)
    batch = make_batch(num_classes=3)
    if _is_teacher(path):
        # A teacher only ever runs frozen, in inference mode.
        model.eval()
        with torch.no_grad():
            outputs = model(batch)
        assert len(outputs) == len(batch)
        return
    model.train()
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    if isinstance(model, DistillMetaArch):
        method_terms = [k for k in losses if re.match(r"loss_(pkd|mse|fgd|pgd|rm|pfi)", k)]
        assert method_terms, sorted(losses)
        assert all(p.grad is None for p in model.teacher.parameters())


def test_every_published_row_has_both_config_kinds():
    for name in PUBLISHED:
        for ext in (".yaml", ".py"):
            assert os.path.join("COCO", name + ext) in ALL_CONFIGS
    for name in HEADLINES:
        for ext in (".yaml", ".py"):
            assert name + ext in ALL_CONFIGS
    teachers = {os.path.basename(c) for c in ALL_CONFIGS if _is_teacher(c)}
    assert teachers == set(TINY_TEACHER_OPTS)


def _expected(name):
    """The recipe of a published row, from its config name: method-student-R50-teacher-schedule."""
    m = re.fullmatch(r"(PKD|FGD|PGD|RM-PFI)-(RetinaNet|FCOS|FasterRCNN)-R50-(.+)-(\d)x", name)
    assert m, f"config name {name} is not METHOD-STUDENT-R50-TEACHER-<N>x"
    method, student, teacher, num_x = m[1], m[2], m[3], int(m[4])
    rcnn = student == "FasterRCNN"
    return {
        "method": method,
        "student_arch": "GeneralizedRCNN" if rcnn else student,
        "losses": {"PKD": ["PKD"], "FGD": ["FGD"], "PGD": ["PGD"], "RM-PFI": ["RM", "PFI"]}[method],
        "lr": 0.02 if rcnn else 0.01,
        "max_iter": 90000 * num_x,
        "steps": (60000 * num_x, 80000 * num_x) if num_x == 1 else (120000, 160000),
        # PKD: 6 for R-CNN students and Swin teachers, 10 for the other one-stage pairs.
        "pkd_weight": 6.0 if rcnn or teacher.startswith("SwinS") else 10.0,
        # PKD distils 4 levels; the FGD (RetinaNet) and PGD authors every head level; RM+PFI: ours.
        "num_levels": 4 if method == "PKD" or rcnn else 5,
        # FGD and PGD inherit, except the authors' FGD Cascade -> Faster R-CNN config.
        "inherit": method == "PGD" or (method == "FGD" and not rcnn),
        "clip": method in ("FGD", "PGD"),
        # (temperature, alpha, beta, gamma, lambda): R-CNN or RetinaNet recipe.
        "fgd": (0.5, 5e-5, 2.5e-5, 5e-5, 5e-7) if rcnn else (0.5, 1e-3, 5e-4, 5e-4, 5e-6),
    }


def _recipe_name(path):
    return HEADLINES.get(_stem(path), _stem(path))


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_states_the_published_numbers(path):
    with open(os.path.join(CONFIGS, path)) as f:
        text = f.read()
    m = re.search(r"Published \(COCO val2017 box AP\): teacher (\S+), baseline (\S+) -> KD (\S+)\.",
                  text)
    assert m, f"{path} does not state the published numbers it targets"
    assert m.groups() == PUBLISHED[_recipe_name(path)]


@pytest.mark.parametrize("path", [c for c in RECIPES if c.endswith(".yaml")])
def test_yacs_recipe(path):
    exp = _expected(_recipe_name(path))
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, path))
    d, s = cfg.MODEL.DISTILL, cfg.SOLVER
    assert cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch"
    assert d.STUDENT_ARCH == exp["student_arch"]
    assert cfg.MODEL.WEIGHTS == R50_IMAGENET and cfg.MODEL.RESNETS.DEPTH == 50
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY) == (16, exp["lr"], 0.9, 1e-4)
    assert (s.WARMUP_METHOD, s.WARMUP_ITERS, s.WARMUP_FACTOR) == ("linear", 500, 0.001)
    assert (s.MAX_ITER, tuple(s.STEPS)) == (exp["max_iter"], exp["steps"])
    assert list(d.LOSSES) == exp["losses"] and d.NUM_LEVELS == exp["num_levels"]
    assert not d.FEATURE_PAIRS and d.INHERIT == exp["inherit"]
    clip = s.CLIP_GRADIENTS
    assert clip.ENABLED == exp["clip"]
    if exp["clip"]:
        assert (clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == ("full_model", 35.0, 2.0)
    assert _clips(build_optimizer(cfg, torch.nn.Linear(3, 3))) == exp["clip"]
    if exp["method"] == "PKD":
        assert d.PKD.WEIGHT == exp["pkd_weight"] and d.PKD.RESIZE_STUDENT
    if exp["method"] == "FGD":
        f = d.FGD
        assert (f.TEMPERATURE, f.ALPHA, f.BETA, f.GAMMA, f.LAMBDA) == pytest.approx(exp["fgd"])
    if exp["method"] == "PGD":
        p = d.PGD
        assert (p.TEMPERATURE, p.ALPHA, p.BETA, p.GAMMA, p.DELTA) == pytest.approx(
            (0.8, 0.04, 0.02, 0.064, 8e-4)
        )
        assert (p.TOPK, p.QUALITY_ALPHA_CLS, p.QUALITY_ALPHA_REG) == (30, 0.8, 0.6)
        assert list(p.LEVEL_WEIGHTS) == [1.0, 1.25, 1.5, 1.75, 2.0]
    if exp["method"] == "RM-PFI":
        assert (d.RM.WEIGHT, d.RM.TEMPERATURE, d.PFI.WEIGHT) == (4.0, 1.0, 1.5)
    teacher = d.TEACHER
    assert os.path.dirname(teacher.CONFIG) == "teachers"
    assert os.path.isfile(os.path.join(CONFIGS, teacher.CONFIG))
    assert re.fullmatch(r"output/teachers/\w+\.pth", teacher.WEIGHTS)


def _clips(optimizer) -> bool:
    """Whether ``optimizer`` clips the joint gradient norm of all parameters to 35."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 100.0)
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    if total < 100.0:
        assert total == pytest.approx(35.0, rel=1e-5)
        return True
    return False


@pytest.mark.parametrize("path", [c for c in RECIPES if c.endswith(".py")])
def test_lazy_recipe(path):
    exp = _expected(_recipe_name(path))
    cfg = _load_lazy(path)
    model = cfg.model
    assert model._target_ is DistillMetaArch
    assert model.student._target_.__name__ == exp["student_arch"]
    assert model.student.backbone.bottom_up.stages.depth == 50
    assert model.student.backbone.bottom_up.freeze_at == 2
    assert LazyConfig.load(os.path.join(CONFIGS, path)).train.init_checkpoint == R50_IMAGENET
    assert cfg.dataloader.train.total_batch_size == 16
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        exp["lr"], 0.9, 1e-4,
    )
    cfg.optimizer.params.model = torch.nn.Linear(3, 3)
    assert _clips(instantiate(cfg.optimizer)) == exp["clip"]

    assert cfg.train.max_iter == exp["max_iter"]
    schedule = instantiate(cfg.lr_multiplier)
    at = lambda it: schedule(it / exp["max_iter"])  # noqa: E731  (LRMultiplier's convention)
    first, second = exp["steps"]
    assert at(0) == pytest.approx(0.001)  # linear warm-up from 0.001 x lr ...
    assert at(250) == pytest.approx(0.001 + 0.999 * 0.5)
    assert at(500) == pytest.approx(1.0)  # ... over 500 iterations
    assert at(first - 1) == pytest.approx(1.0) and at(first) == pytest.approx(0.1)
    assert at(second - 1) == pytest.approx(0.1) and at(second) == pytest.approx(0.01)

    assert model.losses._target_ is OrderedDict
    assert sorted(k for k in model.losses if k != "_target_") == sorted(exp["losses"])
    assert model.num_levels == exp["num_levels"] and not model.get("feature_pairs")
    assert model.inherit == exp["inherit"]
    losses = model.losses
    if exp["method"] == "PKD":
        assert losses.PKD.weight == exp["pkd_weight"] and losses.PKD.resize_student
    if exp["method"] == "FGD":
        f = losses.FGD
        assert (f.temperature, f.alpha, f.beta, f.gamma, f.lambda_) == pytest.approx(exp["fgd"])
        assert [tuple(c) for c in f.channels] == [(256, 256)] * exp["num_levels"]
    if exp["method"] == "PGD":
        p = losses.PGD
        assert (p.temperature, p.alpha, p.beta, p.gamma, p.delta) == pytest.approx(
            (0.8, 0.04, 0.02, 0.064, 8e-4)
        )
        assert (p.topk, p.quality_alpha_cls, p.quality_alpha_reg) == (30, 0.8, 0.6)
        assert list(p.level_weights) == [1.0, 1.25, 1.5, 1.75, 2.0]
    if exp["method"] == "RM-PFI":
        assert (losses.RM.weight, losses.RM.temperature, losses.PFI.weight) == (4.0, 1.0, 1.5)
    teacher = model.teacher
    assert os.path.dirname(teacher.config) == "teachers"
    assert os.path.isfile(os.path.join(CONFIGS, teacher.config))
    assert re.fullmatch(r"output/teachers/\w+\.pth", teacher.weights)
    needs_head = exp["method"] in ("PGD", "RM-PFI")
    assert tuple(teacher.get("required_parts", ("backbone",))) == (
        ("backbone", "head") if needs_head else ("backbone",)
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_yacs_and_lazy_twins_agree(name):
    """The two kinds of one recipe name the same teacher (the same config, or its twin) and
    weights."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "COCO", name + ".yaml"))
    lazy = _load_lazy(os.path.join("COCO", name + ".py"))
    assert os.path.splitext(lazy.model.teacher.config)[0] == os.path.splitext(
        cfg.MODEL.DISTILL.TEACHER.CONFIG
    )[0]
    assert lazy.model.teacher.weights == cfg.MODEL.DISTILL.TEACHER.WEIGHTS


@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_headline_configs_are_the_coco_recipes(name):
    cfg, base = get_distill_cfg(), get_distill_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, name + ".yaml"))
    base.merge_from_file(os.path.join(CONFIGS, "COCO", HEADLINES[name] + ".yaml"))
    assert cfg.dump() == base.dump()
    lazy = _load_lazy(name + ".py")
    lazy_base = _load_lazy(os.path.join("COCO", HEADLINES[name] + ".py"))
    assert OmegaConf.to_container(lazy) == OmegaConf.to_container(lazy_base)


@pytest.mark.parametrize("path", [c for c in ALL_CONFIGS if _is_teacher(c) and c.endswith(".yaml")])
def test_teachers_read_rgb_with_imagenet_statistics(path):
    """The MMDetection teachers' input: RGB, ImageNet mean/std (DistillMetaArch converts the BGR
    student images)."""
    cfg = _load_yacs(path)
    assert cfg.INPUT.FORMAT == "RGB"
    assert (list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)) == IMAGENET_RGB


# Published teachers' trunks: (depth, groups, width per group, stride in 1x1, deformable res3-5).
TEACHER_TRUNKS = {
    "RetinaNet-X101-64x4d-1x.yaml": (101, 64, 4, False, False),
    "FCOS-X101-64x4d-2x.yaml": (101, 64, 4, False, False),
    "CascadeMaskRCNN-X101-32x4d-DCN-1x.yaml": (101, 32, 4, False, True),
    "FasterRCNN-R101-FPN-2x.yaml": (101, 1, 64, False, False),
    "FCOS-R101-3x.yaml": (101, 1, 64, True, False),
}


@pytest.mark.parametrize("name", sorted(TEACHER_TRUNKS))
def test_resnet_teacher_trunks(name):
    r = _load_yacs(os.path.join("teachers", name)).MODEL.RESNETS
    depth, groups, width, stride_in_1x1, deform = TEACHER_TRUNKS[name]
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.STRIDE_IN_1X1) == (
        depth, groups, width, stride_in_1x1
    )
    assert list(r.DEFORM_ON_PER_STAGE) == [False] + [deform] * 3
    assert not r.DEFORM_MODULATED and r.DEFORM_NUM_GROUPS == 1


@pytest.mark.parametrize("path", [c for c in ALL_CONFIGS if c.startswith("Demo") and c.endswith(".py")])
def test_demo_lazy_twin_trains_on_the_yacs_schedule(path):
    """The demo's .py and .yaml twins: same iterations, batch, base lr and lr at every iteration
    (Detectron2's WarmupMultiStepLR from the yacs SOLVER against the lazy lr_multiplier)."""
    yacs = _load_yacs(os.path.splitext(path)[0] + ".yaml")
    lazy = _load_lazy(path)
    s = yacs.SOLVER
    assert (lazy.train.max_iter, lazy.dataloader.train.total_batch_size, lazy.optimizer.lr) == (
        s.MAX_ITER, s.IMS_PER_BATCH, s.BASE_LR
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.BASE_LR)
    yacs_scheduler = build_lr_scheduler(yacs, optimizer)
    multiplier = instantiate(lazy.lr_multiplier)
    for it in range(s.MAX_ITER + 1):  # the trainer also steps the scheduler after the last one
        assert multiplier(it / s.MAX_ITER) * s.BASE_LR == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-6
        ), f"lr at iteration {it}"
        if it < s.MAX_ITER:
            optimizer.step()
            yacs_scheduler.step()


def test_demo_mobilenet_lazy_twin_is_the_yacs_student_and_teacher():
    """What `make demo` trains, as LazyConfig: the same student (parameters, input), teacher and
    PKD loss as PKD-RetinaNet-MobileNetV2.yaml."""
    yacs = _load_yacs("Demo/PKD-RetinaNet-MobileNetV2.yaml")
    lazy = _load_lazy("Demo/PKD-RetinaNet-MobileNetV2.py")
    plain = _load_yacs("Demo/RetinaNet-MobileNetV2.yaml")
    yacs_student = build_model(plain).state_dict()
    lazy_student = instantiate(lazy.model.student).state_dict()
    assert {k: tuple(v.shape) for k, v in lazy_student.items()} == {
        k: tuple(v.shape) for k, v in yacs_student.items()
    }
    # the same ImageNet backbone weights on both sides
    trunk = [k for k in yacs_student if k.startswith("backbone.bottom_up.")]
    assert trunk and all(torch.equal(lazy_student[k], yacs_student[k]) for k in trunk)
    assert lazy.dataloader.train.mapper.image_format == yacs.INPUT.FORMAT == "RGB"
    assert list(lazy.model.student.pixel_std) == list(yacs.MODEL.PIXEL_STD)
    assert lazy.dataloader.test.dataset.names == yacs.DATASETS.TEST[0]
    assert lazy.model.teacher.config == yacs.MODEL.DISTILL.TEACHER.CONFIG
    assert lazy.model.teacher.weights == yacs.MODEL.DISTILL.TEACHER.WEIGHTS
    pkd = lazy.model.losses.PKD
    assert (pkd.weight, pkd.resize_student) == (yacs.MODEL.DISTILL.PKD.WEIGHT, True)
