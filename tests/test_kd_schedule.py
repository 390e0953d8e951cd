"""The distillation weight schedule: linear warm-up from 0, a stop iteration after which the
teacher does not run, kd/weight_scale in the event storage, exact across --resume, and DDP."""
import copy
import json
import os
import shutil

import pytest
import torch

from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from pkd.engine import Trainer
from pkd.kd_schedule import kd_weight_scale

from pkd_testing import DEMO, TINY_INPUT, build_seeded, distill_cfg, make_batch, squares_distill_cfg

from test_train_net import YACS_TINY, run_train_net


@pytest.mark.parametrize("iteration,expected", [(0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0),
                                                (9, 1.0), (10, 0.0), (50, 0.0)])
def test_scale_at_chosen_iterations(iteration, expected):
    assert kd_weight_scale(iteration, warmup_iters=4, stop_iter=10) == expected


def test_zero_turns_each_part_off():
    assert [kd_weight_scale(i) for i in (0, 1, 10**6)] == [1.0, 1.0, 1.0]
    assert kd_weight_scale(0, warmup_iters=0, stop_iter=3) == 1.0
    assert kd_weight_scale(10**6, warmup_iters=8, stop_iter=0) == 1.0


@pytest.mark.parametrize("key", ["WARMUP_ITERS", "STOP_ITER"])
def test_negative_values_are_refused(key):
    with pytest.raises(ValueError, match=f"MODEL.DISTILL.{key} .* must be an integer >= 0"):
        build_seeded(distill_cfg("RetinaNet", [*TINY_INPUT, f"MODEL.DISTILL.{key}", "-1"]))


@pytest.fixture(scope="module")
def scheduled():
    """A distiller that warms up over 4 iterations and stops at iteration 6, counting the runs
    of its teacher's backbone."""
    model = build_seeded(distill_cfg("RetinaNet", [*TINY_INPUT, "MODEL.DISTILL.WARMUP_ITERS", "4",
                                                   "MODEL.DISTILL.STOP_ITER", "6"]))
    model.train()
    calls = []
    model.teacher.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    return model, calls


def step(model, iteration):
    with EventStorage(iteration) as storage:
        torch.manual_seed(0)
        losses = model(make_batch())
    return losses, storage.history("kd/weight_scale").latest()


def test_every_term_is_scaled(scheduled):
    model, _ = scheduled
    # copies: RetinaNet's loss normaliser is an EMA that each training step moves
    full, scale = step(copy.deepcopy(model), 4)
    half, half_scale = step(copy.deepcopy(model), 2)
    assert (scale, half_scale) == (1.0, 0.5)
    terms = [k for k in full if k.startswith("loss_pkd_")]
    assert len(terms) == 4
    for k in terms:
        torch.testing.assert_close(half[k], 0.5 * full[k])
    for k in set(full) - set(terms):  # the student's own losses are untouched
        torch.testing.assert_close(half[k], full[k])


@pytest.mark.parametrize("iteration,teacher_runs", [(0, 0), (1, 1), (5, 1), (6, 0), (100, 0)])
def test_teacher_runs_only_while_distilling(scheduled, iteration, teacher_runs):
    model, calls = scheduled
    calls.clear()
    losses, scale = step(model, iteration)
    assert len(calls) == teacher_runs
    assert (scale > 0) == bool(teacher_runs)
    assert any(k.startswith("loss_pkd_") for k in losses) == bool(teacher_runs)
    assert set(losses) >= {"loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()  # the student still trains


def scale_history(trainer):
    return {it: v for v, it in trainer.storage.history("kd/weight_scale").values()}


def test_schedule_is_exact_across_resume(squares, tmp_path):
    def run(output_dir, resume=False):
        cfg = squares_distill_cfg("random", [
            "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
            "MODEL.DISTILL.WARMUP_ITERS", "3", "OUTPUT_DIR", str(output_dir)])
        seed_all_rng(0)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return trainer

    whole = run(tmp_path / "whole")
    assert scale_history(whole) == {0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0}
    # interrupted after iteration 1: resumes at 2 with the schedule of iterations 2 and 3
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "whole" / "model_0000001.pth", tmp_path / "resumed")
    (tmp_path / "resumed" / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.start_iter == 2
    assert scale_history(resumed) == {2: 2 / 3, 3: 1.0}


def test_two_process_training_with_kd_modules_while_off(demo_datasets_dir, tmp_path):
    """FGD's trainable modules get no gradient from the student alone; DDP still steps."""
    run_train_net(
        ["--config-file", os.path.join(DEMO, "FGD-RetinaNet-R18.yaml"), "--num-gpus", "2",
         *YACS_TINY, "MODEL.DISTILL.TEACHER.WEIGHTS", "random",
         # off at iteration 0 (warm-up) and 2 (stopped), on at 1
         "MODEL.DISTILL.WARMUP_ITERS", "2", "MODEL.DISTILL.STOP_ITER", "2",
         "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)],
        demo_datasets_dir,
    )
    with open(tmp_path / "metrics.json") as f:
        last = [json.loads(line) for line in f if '"iteration": 2,' in line][-1]
    assert last["kd/weight_scale"] == 0.0 and last["loss_kd_idle"] == 0.0
    assert os.path.isfile(tmp_path / "model_final.pth")
