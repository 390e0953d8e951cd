"""Session fixtures shared by several test modules."""
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.env import seed_all_rng

from pkd.data import build_demo_dataset
from pkd.engine import Trainer

from pkd_testing import (
    SQUARES,
    SQUARES_CLASSES,
    build_squares_dataset,
    squares_cfg,
    squares_distill_cfg,
    train_in_process,
)

# The squares teacher's schedule: 80 steps of batch 2 overfit the 8 images (box AP ~40).
SQUARES_TEACHER_OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "80", "SOLVER.BASE_LR", "0.04",
    "SOLVER.STEPS", "(64,)", "SOLVER.WARMUP_ITERS", "10", "SOLVER.CHECKPOINT_PERIOD", "1000",
]


@pytest.fixture(scope="session")
def squares(tmp_path_factory):
    """The squares dataset registered as SQUARES (the training and the test set)."""
    json_path, image_dir = build_squares_dataset(str(tmp_path_factory.mktemp("squares")))
    register_coco_instances(SQUARES, {"thing_classes": list(SQUARES_CLASSES)}, json_path, image_dir)
    yield SQUARES
    DatasetCatalog.remove(SQUARES)
    MetadataCatalog.remove(SQUARES)


@pytest.fixture(scope="session")
def squares_teacher(squares, tmp_path_factory):
    """Weights of a RetinaNet-R18 that detects the squares (trained here, tens of seconds);
    returns (weights path, its box AP on SQUARES)."""
    out = tmp_path_factory.mktemp("squares_teacher")
    cfg = squares_cfg(opts=[*SQUARES_TEACHER_OPTS, "OUTPUT_DIR", str(out)])
    seed_all_rng(0)
    # One thread: with two, float reductions are split differently and 80 steps at this LR end
    # elsewhere (box AP 24 instead of 41 in one run); on a shared 2-core machine the second
    # thread also spins (353 s instead of 29 s for this fixture in one measurement).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    ap = trainer._last_eval_results["bbox"]["AP"]
    assert ap > 20, f"the squares teacher did not learn (AP {ap:.1f}): the fixture is broken"
    return str(out / "model_final.pth"), ap


@pytest.fixture(scope="session")
def demo_datasets_dir(tmp_path_factory):
    """A DETECTRON2_DATASETS folder holding the demo dataset, built once: a tools/train_net.py
    subprocess (several, with --num-gpus) finds it there instead of building it."""
    root = tmp_path_factory.mktemp("datasets")
    build_demo_dataset(str(root / "pkd_demo"))
    return root


@pytest.fixture(scope="session")
def tiny_runs(squares_teacher, tmp_path_factory):
    """Two finished 4-iteration runs on SQUARES, as tools/train_net.py leaves them (config.yaml,
    metrics.json, TensorBoard events, model_final.pth, eval_results.json): the RetinaNet student
    distilled with PKD from the squares teacher (VIS_PERIOD 2), and the same student alone.
    Returns (distilled run dir, baseline run dir)."""
    tmp = tmp_path_factory.mktemp("runs")
    schedule = ["SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "0", "SOLVER.IMS_PER_BATCH", "2"]
    distilled = train_in_process(
        tmp / "pkd", squares_distill_cfg(squares_teacher[0], [*schedule, "VIS_PERIOD", "2"])
    )
    return distilled, train_in_process(tmp / "plain", squares_cfg(opts=schedule))
