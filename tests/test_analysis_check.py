"""tools/check_distill.py's logic on the squares teacher: a sound set-up passes; a swapped
channel order, a random teacher and an over-weighted loss fail or warn as they should."""
import json
import re

import pytest

from detectron2.config import LazyConfig

from pkd.analysis.check import main

from pkd_testing import SQUARES, SQUARES_MODEL, lazy_squares_distill_cfg, squares_distill_cfg


def run_check(tmp_path, config_file, *opts, num_batches=1, num_images=4):
    code = main(["--config-file", str(config_file), "--output", str(tmp_path), "--num-batches",
                 str(num_batches), "--num-images", str(num_images), *opts])
    with open(tmp_path / "check_distill.json") as f:
        return code, json.load(f)


def yacs_file(tmp_path, weights, opts=()):
    path = tmp_path / "config.yaml"
    path.write_text(squares_distill_cfg(weights, list(opts)).dump())
    return path


def test_sound_set_up_passes(squares_teacher, tmp_path, capsys):
    weights, ap = squares_teacher
    code, report = run_check(tmp_path, yacs_file(tmp_path, weights), num_batches=2, num_images=8)
    out = capsys.readouterr().out
    assert code == 0 and report["sound"] and report["failures"] == [], out
    teacher = report["teacher"]
    assert teacher["num_images"] == 8 and teacher["dataset"] == SQUARES
    # its own data path (its own config's mapper) and the distiller's agree to the digit here
    assert teacher["own_path"]["AP"] == pytest.approx(ap) == teacher["distiller_path"]["AP"]
    assert teacher["other_channel_order"]["AP"] < ap / 4
    pairs = report["feature_pairs"]
    assert list(pairs) == ["p3", "p4", "p5", "p6"]
    assert [p["student_stride"] for p in pairs.values()] == [8, 16, 32, 64]
    assert all(p["student_rms"] > 0 and p["teacher_rms"] > 0 and -1 <= p["pcc"] <= 1
               for p in pairs.values())
    terms = report["loss_terms"]
    assert sorted(terms) == [f"loss_pkd_p{i}" for i in (3, 4, 5, 6)]
    assert all(t["grad_norm"] > 0 and t["weight"] == 6.0 for t in terms.values())
    assert report["detection"]["grad_norm"] > 0
    assert "SOUND: the set-up passed every check." in out
    assert "(b) the distiller's path" in out and "loss_pkd_p3" in out


def test_swapped_channel_order_fails(squares_teacher, tmp_path, capsys):
    weights, _ = squares_teacher
    opts = ["MODEL.DISTILL.TEACHER.OPTS", str([*SQUARES_MODEL, "INPUT.FORMAT", "RGB"])]
    code, report = run_check(tmp_path, yacs_file(tmp_path, weights, opts))
    assert code == 1 and not report["sound"]
    assert report["teacher"]["teacher_format"] == "RGB"
    (failure,) = report["failures"]
    assert "channel order: " in failure and "trained with INPUT.FORMAT BGR" in failure
    assert "FAIL: " in capsys.readouterr().out


def test_random_teacher_fails(squares, tmp_path):
    code, report = run_check(tmp_path, yacs_file(tmp_path, "random"))
    assert code == 1
    assert report["teacher"]["distiller_path"]["AP"] < 1.0
    assert "MODEL.DISTILL.TEACHER.WEIGHTS is 'random'" in report["failures"][0]


def test_over_weighted_loss_warns_with_the_weight_for_parity(squares_teacher, tmp_path):
    weights, _ = squares_teacher
    config = yacs_file(tmp_path, weights, ["MODEL.DISTILL.PKD.WEIGHT", "6000.0"])
    code, report = run_check(tmp_path, config)
    assert code == 0 and report["sound"]  # a warning, not a failure
    terms = report["loss_terms"]
    assert all(t["ratio"] > 10 for t in terms.values())
    assert len(report["warnings"]) == 4
    for warning, (term, t) in zip(report["warnings"], terms.items()):
        # the weight for parity is the one that makes the gradient ratio 1 (gradients are linear
        # in the weight)
        assert t["parity_weight"] == pytest.approx(6000 / t["ratio"])
        assert warning.startswith(f"{term}: its gradient on the student's FPN is")
        assert f"PKD weight 6000 -> {t['parity_weight']:.3g}" in warning


def test_the_student_starts_from_model_weights_as_training_does(squares_teacher, tmp_path):
    # the squares teacher is the student's own architecture: a student initialised from its
    # checkpoint has the teacher's very feature maps
    weights, _ = squares_teacher
    code, report = run_check(tmp_path, yacs_file(tmp_path, weights, ["MODEL.WEIGHTS", weights]))
    assert code == 0 and report["student_weights"] == weights
    assert all(p["pcc"] == pytest.approx(1.0, abs=1e-4) for p in report["feature_pairs"].values())
    assert all(t["value"] == pytest.approx(0.0, abs=1e-3) for t in report["loss_terms"].values())


def test_lazy_config_saved_by_detectron2(squares_teacher, tmp_path):
    path = tmp_path / "lazy.yaml"  # what default_setup writes for a LazyConfig run
    LazyConfig.save(lazy_squares_distill_cfg(squares_teacher[0], tmp_path), str(path))
    code, report = run_check(tmp_path, path, "model.losses.PKD.weight=1.0")
    assert code == 0 and report["sound"]
    assert report["loss_terms"]["loss_pkd_p3"]["weight"] == 1.0
    teacher = report["teacher"]
    assert teacher["distiller_path"]["AP"] > 20
    assert teacher["own_path"]["AP"] == pytest.approx(teacher["distiller_path"]["AP"])


def test_teacher_fed_at_another_size_than_its_own_fails(squares_teacher, tmp_path):
    # the student tests at 40 px, the teacher's own config at 64: distillation would show the
    # teacher images half as large again as those it was trained and evaluated on
    weights, _ = squares_teacher
    code, report = run_check(tmp_path, yacs_file(tmp_path, weights, [
        "INPUT.MIN_SIZE_TEST", "40", "INPUT.MAX_SIZE_TEST", "60"]))
    teacher = report["teacher"]
    assert code == 1
    assert abs(teacher["own_path"]["AP"] - teacher["distiller_path"]["AP"]) > 1.0
    (failure,) = [f for f in report["failures"] if "differs from its own data path" in f]
    assert re.search(r"the first image is \[4\d, 40\] \(student's test resize\) vs \[\d+, 64\] "
                     r"\(teacher's own\) - they differ", failure)
