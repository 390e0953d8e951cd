"""Checkpoints: student-only "model" that deploys in plain Detectron2, exact resume, safe and
explicit loading."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from pkd.checkpoint import UNSAFE_LOAD_ENV, CheckpointLoadError, DistillCheckpointer
from pkd.data import DEMO_CLASSES, build_demo_dataset
from pkd.engine import Trainer, build_checkpointer
from pkd.meta_arch import student_config

from pkd_testing import DEMO, TINY_INPUT, TINY_TEACHER_OPTS, build_seeded, distill_cfg, make_batch

TRAIN, VAL = "pkd_ckpt_train", "pkd_ckpt_val"


@pytest.fixture(scope="module", autouse=True)
def tiny_dataset(tmp_path_factory):
    paths = build_demo_dataset(str(tmp_path_factory.mktemp("data")), num_train=6, num_val=3)
    for name, (json_file, image_dir) in zip((TRAIN, VAL), paths.values()):
        register_coco_instances(name, {"thing_classes": list(DEMO_CLASSES)}, json_file, image_dir)
    yield
    for name in (TRAIN, VAL):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def train_cfg(output_dir, max_iter=4, opts=()):
    return distill_cfg("RetinaNet", TINY_INPUT + [
        "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "(3,)",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.RANDOM_FLIP", "horizontal",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(output_dir), *opts,
    ])


def run_training(cfg, resume=False):
    seed_all_rng(cfg.SEED)  # what default_setup does in tools/train_net.py
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return run_training(train_cfg(out)), out


def plain_student(config="RetinaNet-R18.yaml"):
    """The student built by plain Detectron2 from its own config (no pkd config keys)."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(DEMO, config))
    cfg.merge_from_list(TINY_INPUT)
    return build_model(cfg).eval()


def test_model_entry_is_exactly_the_student(trained):
    trainer, out = trained
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    student = trainer.model.student
    assert set(checkpoint["model"]) == set(student.state_dict())
    assert not any("teacher" in k for k in checkpoint["model"])
    plain = plain_student()
    incompatible = plain.load_state_dict(checkpoint["model"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def test_final_checkpoint_deploys_in_plain_detectron2(trained):
    trainer, out = trained
    plain = plain_student()
    DetectionCheckpointer(plain).load(str(out / "model_final.pth"))
    distilled = trainer.model.eval()
    batch = make_batch(sizes=((64, 80), (72, 64)))
    with torch.no_grad():
        expected = distilled(batch)
        got = plain(batch)
    for a, b in zip(expected, got):
        assert len(a["instances"]) > 0 or len(b["instances"]) == 0
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_checkpoint_size_does_not_depend_on_the_teacher(tmp_path):
    sizes = {}
    for name, opts in {"small": TINY_TEACHER_OPTS, "large": ["MODEL.RESNETS.DEPTH", "34"]}.items():
        cfg = train_cfg(tmp_path / name, max_iter=1, opts=["MODEL.DISTILL.TEACHER.OPTS", str(opts)])
        trainer = run_training(cfg)
        teacher_bytes = sum(t.numel() * t.element_size() for t in trainer.model.teacher.state_dict().values())
        student_bytes = sum(t.numel() * t.element_size() for t in trainer.model.student.state_dict().values())
        checkpoint = torch.load(tmp_path / name / "model_final.pth", weights_only=True)
        model_bytes = sum(t.numel() * t.element_size() for t in checkpoint["model"].values())
        assert model_bytes == student_bytes
        sizes[name] = (os.path.getsize(tmp_path / name / "model_final.pth"), teacher_bytes)
    (small_file, small_teacher), (large_file, large_teacher) = sizes["small"], sizes["large"]
    assert large_teacher > small_teacher + 5e6
    assert abs(large_file - small_file) < 10_000


def test_resume_continues_exactly(trained, tmp_path):
    _, out = trained
    # An interrupted run: what the uninterrupted one had written after 2 of 4 iterations.
    shutil.copy(out / "model_0000001.pth", tmp_path / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run_training(train_cfg(tmp_path), resume=True)
    assert resumed.start_iter == 2
    final = torch.load(out / "model_final.pth", weights_only=True)
    again = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == again["iteration"] == 3
    for k, v in final["model"].items():
        assert torch.allclose(v, again["model"][k], rtol=1e-5, atol=1e-6), k
    # optimizer (momentum) and LR scheduler travel in Detectron2's "trainer" entry
    assert "optimizer" in again["trainer"]["_trainer"]
    assert "LRScheduler" in again["trainer"]["hooks"]
    assert "loss_normalizer" in again["resume_state"]["student_ema"]


def test_student_init_from_zoo_pkl_with_resnet_teacher(tmp_path):
    # A torchvision/ImageNet-style backbone file in Detectron2's model-zoo .pkl form: numpy arrays,
    # names relative to the ResNet, "matching_heuristics" as the zoo's converted files have.
    torch.manual_seed(1)
    donor = build_model(student_config(distill_cfg("RetinaNet")))
    arrays = {k[len("backbone.bottom_up."):]: v.numpy() for k, v in donor.state_dict().items()
              if k.startswith("backbone.bottom_up.")}
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test", "matching_heuristics": True}, f)
    cfg = distill_cfg("RetinaNet", ["MODEL.WEIGHTS", str(path)])
    model = build_seeded(cfg, seed=2)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    build_checkpointer(model).resume_or_load(str(path), resume=False)
    for name, array in arrays.items():
        loaded = model.student.state_dict()["backbone.bottom_up." + name]
        assert np.array_equal(loaded.numpy(), array), name
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_weights_of_another_model_are_an_error(tmp_path):
    # A common mistake: the state of a wrapper, whose keys all carry a prefix.
    wrapped = {"model": {"model." + k: v for k, v in plain_student().state_dict().items()}}
    path = tmp_path / "wrapper.pth"
    torch.save(wrapped, path)
    student = plain_student()
    with pytest.raises(CheckpointLoadError, match=r"wrapper.pth' matches none.*model.backbone"):
        DistillCheckpointer(student).load(str(path))


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    _, out = trained
    data = (out / "model_final.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        DistillCheckpointer(plain_student()).load(str(path))
    pkl = tmp_path / "truncated.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": np.zeros(100)}})[:50])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        DistillCheckpointer(plain_student()).load(str(pkl))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_crafted_pickle_never_runs(tmp_path, suffix, monkeypatch):
    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    marker = str(tmp_path / "pwned")
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"w": _Exploit(marker)}, "__author__": "x"}))
    else:
        torch.save({"model": {"w": _Exploit(marker)}}, path)
    with pytest.raises(CheckpointLoadError, match=f"Refused to load.*{UNSAFE_LOAD_ENV}=1"):
        DistillCheckpointer(plain_student()).load(str(path))
    assert not os.path.exists(marker)


NAME_TO_NAME = ["MODEL.DISTILL.FEATURE_PAIRS", "[['p3', 'p3'], ['p4', 'p4'], ['p5', 'p5']]"]


def test_inherit_copies_fpn_and_head_where_they_match():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.INHERIT", "True"] + NAME_TO_NAME)
    model = build_seeded(cfg)
    copied, not_copied = model.inherit_from_teacher()
    teacher = model.teacher.model.state_dict()
    student = model.student.state_dict()
    assert "backbone.fpn_lateral3.weight" in copied
    assert torch.equal(student["backbone.fpn_lateral3.weight"], teacher["backbone.fpn_lateral3.weight"])
    assert "head.cls_score.weight" in not_copied  # the R-CNN teacher has no dense head
    assert not any(k.startswith("backbone.bottom_up.") for k in copied + not_copied)
    off = build_seeded(distill_cfg("RetinaNet"))
    assert not torch.equal(off.student.state_dict()["backbone.fpn_lateral3.weight"],
                           off.teacher.model.state_dict()["backbone.fpn_lateral3.weight"])


def test_inherit_is_refused_when_pairs_are_not_name_to_name():
    # The default pairing of a RetinaNet student with the R-CNN teacher is p3<-p2, ..., p6<-p5.
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.INHERIT", "True"])
    with pytest.raises(ValueError, match=r"INHERIT.*\('p3', 'p2'\).*another name"):
        build_seeded(cfg)


def test_trainable_kd_modules_are_saved_apart_and_restored(tmp_path):
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.LOSSES", "['FGD']"])
    model = build_seeded(cfg, seed=0)
    with torch.no_grad():
        for p in model.distill_losses.parameters():
            p.add_(0.5)
    build_checkpointer(model, str(tmp_path)).save("model_0000009")
    saved = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert set(saved["model"]) == set(model.student.state_dict())
    assert set(saved["distill_losses"]) == set(model.distill_losses.state_dict())
    fresh = build_seeded(cfg, seed=1)
    build_checkpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in model.distill_losses.state_dict().items():
        assert torch.equal(fresh.distill_losses.state_dict()[k], v), k
    for k, v in model.student.state_dict().items():
        assert torch.equal(fresh.student.state_dict()[k], v), k
