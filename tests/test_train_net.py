"""End-to-end runs of tools/train_net.py (subprocesses, as a user runs it) on the demo dataset."""
import json
import os
import subprocess
import sys

import pytest

from pkd_testing import DEMO, REPO

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
YACS_TINY = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
             "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
             "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
             "DATALOADER.NUM_WORKERS", "0",
             # after 3 iterations no score passes the default 0.05: evaluate all boxes
             "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
LAZY_TINY = ["train.max_iter=3", "dataloader.train.total_batch_size=2",
             "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
             "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
             "dataloader.train.mapper.augmentations.0.max_size=96",
             "dataloader.test.mapper.augmentations.0.short_edge_length=64",
             "dataloader.test.mapper.augmentations.0.max_size=96",
             "model.student.test_score_thresh=0.0"]


def run_train_net(args, datasets_dir):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir))
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def read_metrics(output_dir):
    """All scalars ever written to metrics.json (last value of each)."""
    metrics = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            metrics.update(json.loads(line))
    return metrics


def read_ap(output_dir):
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        return json.load(f)["bbox"]["AP"]


def read_detections(output_dir):
    path = os.path.join(output_dir, "inference", "pkd_demo_val", "coco_instances_results.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def yacs_run(tmp_path_factory, datasets_dir):
    out = tmp_path_factory.mktemp("yacs")
    run_train_net(
        ["--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.yaml"), *YACS_TINY,
         "MODEL.DISTILL.TEACHER.WEIGHTS", "random", "OUTPUT_DIR", str(out)],
        datasets_dir,
    )
    return out


def test_yacs_train_and_eval(yacs_run):
    assert os.path.isfile(yacs_run / "model_final.pth")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(yacs_run))
    metrics = read_metrics(yacs_run)
    for key in ["loss_cls", "loss_pkd_p3", "loss_pkd_p6", "kd/pcc_p3", "bbox/AP"]:
        assert key in metrics, key
    assert 0.0 <= read_ap(yacs_run) <= 100.0
    assert len(read_detections(yacs_run)) > 0
    # CPU training keeps freed memory for reuse (pkd.cpu_memory), and pkd's log lines are kept.
    assert "CPU memory: freed heap memory is kept for reuse" in (yacs_run / "log.txt").read_text()


def test_yacs_eval_only_never_touches_the_teacher(yacs_run, datasets_dir, tmp_path):
    # The teacher weights do not exist: --eval-only must neither build nor load the teacher.
    run_train_net(
        ["--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.yaml"), "--eval-only", *YACS_TINY,
         "MODEL.WEIGHTS", str(yacs_run / "model_final.pth"),
         "MODEL.DISTILL.TEACHER.WEIGHTS", "/nonexistent/teacher.pth", "OUTPUT_DIR", str(tmp_path)],
        datasets_dir,
    )
    assert read_detections(tmp_path) == read_detections(yacs_run)
    assert read_ap(tmp_path) == read_ap(yacs_run)


def test_plain_student_config_evaluates_the_distilled_checkpoint(yacs_run, datasets_dir, tmp_path):
    # The exported student in its own (non-distillation) config: the same detections and AP.
    run_train_net(
        ["--config-file", os.path.join(DEMO, "RetinaNet-R18.yaml"), "--eval-only", *YACS_TINY,
         "MODEL.WEIGHTS", str(yacs_run / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)],
        datasets_dir,
    )
    assert read_detections(tmp_path) == read_detections(yacs_run)
    assert read_ap(tmp_path) == read_ap(yacs_run)


def test_lazy_train_and_eval(datasets_dir, tmp_path):
    run_train_net(
        ["--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.py"), *LAZY_TINY,
         "model.teacher.weights=random", f"train.output_dir={tmp_path}"],
        datasets_dir,
    )
    assert os.path.isfile(tmp_path / "model_final.pth")
    metrics = read_metrics(tmp_path)
    assert "loss_pkd_p5" in metrics and "kd/pcc_p5" in metrics and "bbox/AP" in metrics
    evaluated = tmp_path / "eval"
    run_train_net(
        ["--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.py"), "--eval-only", *LAZY_TINY,
         f"train.init_checkpoint={tmp_path / 'model_final.pth'}",
         "model.teacher.weights=/nonexistent/teacher.pth", f"train.output_dir={evaluated}"],
        datasets_dir,
    )
    assert read_detections(evaluated) == read_detections(tmp_path)


def test_missing_teacher_checkpoint_stops_training(datasets_dir, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir))
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.yaml"),
         *YACS_TINY, "MODEL.DISTILL.TEACHER.WEIGHTS", str(tmp_path / "teacher.pth"),
         "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "teacher.pth' does not exist" in proc.stderr
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_two_process_cpu_training(datasets_dir, tmp_path):
    """Detectron2's launch with 2 processes on CPU (gloo): DDP over the student only."""
    run_train_net(
        ["--config-file", os.path.join(DEMO, "PKD-RetinaNet-R18.yaml"), "--num-gpus", "2",
         *YACS_TINY, "SOLVER.MAX_ITER", "2", "MODEL.DISTILL.TEACHER.WEIGHTS", "random",
         "OUTPUT_DIR", str(tmp_path)],
        datasets_dir,
    )
    metrics = read_metrics(tmp_path)
    assert "loss_pkd_p3" in metrics and "bbox/AP" in metrics
    assert os.path.isfile(tmp_path / "model_final.pth")
