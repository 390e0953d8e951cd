"""The config convention (pkd.config, pkd.teacher.resolve_teacher_config): a user's own script
loads every shipped yacs config with ``get_cfg(); add_distill_config(cfg); merge_from_file``, and
``build_model`` builds the model ``tools/train_net.py`` builds from that file, from any working
directory; the README's "Your own script" snippet runs as written."""
import importlib
import inspect
import os
import pkgutil
import re

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import pkd
from pkd.config import PROJECT_CONFIGS, add_distill_config, get_distill_cfg
from pkd.engine import Trainer, setup
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import resolve_teacher_config

from pkd_testing import CONFIGS, REPO
from test_configs import ALL_CONFIGS, tiny_yacs_opts

YAML_CONFIGS = [c for c in ALL_CONFIGS if c.endswith(".yaml")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _keys(cfg, prefix=""):
    """Every leaf key of a CfgNode, dotted."""
    keys = set()
    for key, value in cfg.items():
        name = prefix + key
        keys |= _keys(value, name + ".") if isinstance(value, dict) else {name}
    return keys


def _project_config_adders():
    """Every function named add_*_config defined in the pkd package."""
    adders = {}
    for info in pkgutil.walk_packages(pkd.__path__, "pkd."):
        module = importlib.import_module(info.name)
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if re.fullmatch(r"add_\w+_config", name) and fn.__module__ == module.__name__:
                adders[f"{module.__name__}.{name}"] = fn
    return adders


def test_project_configs_is_this_checkout():
    assert PROJECT_CONFIGS == CONFIGS


def test_add_distill_config_adds_every_key_group_of_the_project():
    adders = _project_config_adders()
    assert {"pkd.config.add_fcos_config", "pkd.modeling.swin.add_swin_config"} <= set(adders)
    full = get_cfg()
    add_distill_config(full)
    for name, add in adders.items():
        cfg = get_cfg()
        add(cfg)
        missing = _keys(cfg) - _keys(full)
        assert not missing, f"add_distill_config does not apply {name} (pkd.config.CONFIG_GROUPS)"
    assert {"MODEL.DISTILL.TEACHER.CONFIG", "MODEL.FCOS.NUM_CLASSES", "MODEL.SWIN.DEPTHS"} <= _keys(full)
    assert get_distill_cfg().dump() == full.dump()


def test_add_distill_config_twice_keeps_what_is_set():
    cfg = get_cfg()
    add_distill_config(cfg)
    defaults = cfg.dump()
    cfg.MODEL.DISTILL.PKD.WEIGHT = 3.0
    del cfg.MODEL.FCOS["NMS_THRESH_TEST"]
    add_distill_config(cfg)
    assert cfg.MODEL.DISTILL.PKD.WEIGHT == 3.0  # kept
    assert cfg.MODEL.FCOS.NMS_THRESH_TEST == 0.6  # a missing key is added back
    cfg.MODEL.DISTILL.PKD.WEIGHT = 6.0
    assert cfg.dump() == defaults
    cfg.freeze()
    add_distill_config(cfg)  # nothing is missing: a frozen config is fine


@pytest.fixture(scope="module")
def train_net_output(tmp_path_factory):
    # One OUTPUT_DIR for every config: default_setup's loggers are created once per directory.
    return str(tmp_path_factory.mktemp("train_net_output"))


def _modules(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def _losses(model):
    plain = (bool, int, float, str, tuple, list)
    return {
        name: (type(loss).__name__, {k: v for k, v in vars(loss).items() if isinstance(v, plain)})
        for name, loss in model.distill_losses.items()
    }


@pytest.mark.parametrize("path", YAML_CONFIGS)
def test_own_script_builds_what_train_net_builds(path, tmp_path, monkeypatch, train_net_output):
    """Same config, same modules, same parameters (same seed), same teacher and losses: through
    tools/train_net.py's setup run from the repository root, and through a plain Detectron2
    script run from an unrelated directory."""
    config_file = os.path.join(CONFIGS, path)
    opts = tiny_yacs_opts(path) + ["OUTPUT_DIR", train_net_output]

    monkeypatch.chdir(REPO)
    train_cfg = setup(default_argument_parser().parse_args(["--config-file", config_file, *opts]))
    torch.manual_seed(0)
    train_model = Trainer.build_model(train_cfg)

    monkeypatch.chdir(tmp_path)
    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)

    assert cfg.dump() == train_cfg.dump()
    assert _modules(model) == _modules(train_model)
    state, train_state = model.state_dict(), train_model.state_dict()
    assert list(state) == list(train_state)
    for key, value in state.items():
        assert torch.equal(value, train_state[key]), key
    if isinstance(model, DistillMetaArch):
        expected = os.path.join(CONFIGS, cfg.MODEL.DISTILL.TEACHER.CONFIG)
        assert model.teacher.config == train_model.teacher.config == expected
        assert model.feature_pairs == train_model.feature_pairs
        assert _losses(model) == _losses(train_model) and _losses(model)


@pytest.mark.parametrize("path", [c for c in ALL_CONFIGS if not c.startswith("teachers")])
def test_shipped_configs_name_teachers_relative_to_configs(path):
    """One way of naming a teacher in every shipped config, yacs or LazyConfig: its path relative
    to configs/ (the value as loaded, _BASE_ and LazyConfig imports applied)."""
    full = os.path.join(CONFIGS, path)
    if path.endswith(".yaml"):
        cfg = get_distill_cfg()
        cfg.merge_from_file(full)
        if cfg.MODEL.META_ARCHITECTURE != "DistillMetaArch":
            return
        name = cfg.MODEL.DISTILL.TEACHER.CONFIG
    else:
        model = LazyConfig.load(full).model
        if model._target_ is not DistillMetaArch:
            return
        name = model.teacher.config
    assert not os.path.isabs(name) and not name.startswith(".."), name
    assert os.path.isfile(os.path.join(CONFIGS, name)), name


def test_teacher_config_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "teachers/FCOS-R101-3x.yaml"
    shipped = os.path.join(CONFIGS, name)
    assert resolve_teacher_config(name) == shipped  # relative to configs/, from anywhere
    assert resolve_teacher_config(shipped) == shipped  # absolute
    own = tmp_path / "my_teacher.yaml"
    own.write_text("MODEL:\n  META_ARCHITECTURE: RetinaNet\n")
    assert resolve_teacher_config("my_teacher.yaml") == str(own)  # relative to the cwd

    (tmp_path / "teachers").mkdir()
    (tmp_path / name).write_text("MODEL:\n  META_ARCHITECTURE: RetinaNet\n")
    with pytest.raises(ValueError, match=r"ambiguous.*absolute path"):
        resolve_teacher_config(name)
    assert resolve_teacher_config(str(tmp_path / name)) == str(tmp_path / name)
    monkeypatch.chdir(CONFIGS)
    assert resolve_teacher_config(name) == shipped  # the same file both ways: not ambiguous

    zoo = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
    assert resolve_teacher_config(zoo).endswith(zoo) and os.path.isfile(resolve_teacher_config(zoo))
    with pytest.raises(FileNotFoundError, match=re.escape(CONFIGS)):
        resolve_teacher_config("../teachers/FCOS-R101-3x.yaml")  # the old file-relative naming
    with pytest.raises(ValueError, match="is empty"):
        resolve_teacher_config("")


def _readme_snippet(title):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    m = re.search(rf"^#+ {re.escape(title)}\n.*?```python\n(.*?)```", readme, re.S | re.M)
    assert m, f"README.md has no python block under the heading '{title}'"
    return m.group(1)


def test_readme_own_script_snippet(tmp_path, monkeypatch):
    """The README's snippet, run as a user runs it: from a directory with the project's configs/
    and the teacher checkpoint `make demo` trains (here: seeded random weights)."""
    snippet = _readme_snippet("Your own script")
    config = re.search(r"merge_from_file\(\"(.*?)\"\)", snippet)[1]
    monkeypatch.chdir(tmp_path)
    os.symlink(CONFIGS, tmp_path / "configs")
    cfg = get_distill_cfg()
    cfg.merge_from_file(config)
    teacher_cfg = get_distill_cfg()
    teacher_cfg.merge_from_file(resolve_teacher_config(cfg.MODEL.DISTILL.TEACHER.CONFIG))
    torch.manual_seed(0)
    teacher_state = build_model(teacher_cfg).state_dict()
    os.makedirs(os.path.dirname(cfg.MODEL.DISTILL.TEACHER.WEIGHTS))
    torch.save({"model": teacher_state}, cfg.MODEL.DISTILL.TEACHER.WEIGHTS)

    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, DistillMetaArch)
    assert type(model.student).__name__ == cfg.MODEL.DISTILL.STUDENT_ARCH
    assert model.teacher.config == resolve_teacher_config(cfg.MODEL.DISTILL.TEACHER.CONFIG)
    assert list(model.distill_losses) == list(cfg.MODEL.DISTILL.LOSSES)
    loaded = model.teacher.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher_state.items())
