"""benchmarks/accuracy.py: the study's rows, overrides and statistics (the trainings themselves
are the demo's, tested in test_demo.py and test_train_net.py)."""
import importlib.util
import os

import pytest

from detectron2.modeling import build_model

from pkd.config import get_distill_cfg

from pkd_testing import REPO

_spec = importlib.util.spec_from_file_location(
    "accuracy_benchmark", os.path.join(REPO, "benchmarks", "accuracy.py")
)
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)


@pytest.mark.parametrize(
    "row", [r for r in accuracy.ROWS + accuracy.DIAGNOSTIC_ROWS if r != "baseline"]
)
def test_every_row_builds_its_method_without_inheriting(row):
    """Each row's distiller passes the construction checks (pairs, grids, anchors) with its
    teacher; the teachers keep random weights here."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(accuracy.DISTILL)
    cfg.merge_from_list(accuracy.row_overrides(row, {t: "random" for t in accuracy.TEACHERS}))
    teacher, method = row.split("/")
    assert cfg.MODEL.DISTILL.TEACHER.CONFIG == accuracy.TEACHERS[teacher][0]
    assert cfg.MODEL.DISTILL.INHERIT is False
    model = build_model(cfg)
    assert "+".join(model.distill_losses) == method
    assert model.teacher.model.__class__.__name__ == (
        "GeneralizedRCNN" if teacher == "two-stage" else "RetinaNet"
    )


def test_summary_pairs_each_seed_with_the_baseline_of_the_same_seed():
    results = {
        "dense/PKD": {0: {"AP": 12.0, "AP50": 20.0, "AP75": 10.0},
                      1: {"AP": 9.0, "AP50": 20.0, "AP75": 10.0}},
        "baseline": {0: {"AP": 10.0, "AP50": 20.0, "AP75": 10.0},
                     1: {"AP": 10.0, "AP50": 18.0, "AP75": 10.0}},
    }
    summary = accuracy.summarize(results)
    assert [entry["row"] for entry in summary] == ["baseline", "dense/PKD"]
    pkd = summary[1]
    assert pkd["AP"]["mean"] == pytest.approx(10.5)
    assert pkd["AP"]["std"] == pytest.approx(2.1213203)
    assert pkd["gain_AP"]["values"] == [2.0, -1.0]
    assert pkd["gain_AP50"]["values"] == [0.0, 2.0]
    table = accuracy.format_table(summary)
    assert "+0.5 ± 2.1" in table and table.index("baseline") < table.index("dense/PKD")


def test_without_the_baseline_there_are_no_gains():
    summary = accuracy.summarize({"dense/PKD": {0: {"AP": 12.0, "AP50": 20.0, "AP75": 10.0}}})
    assert "gain_AP" not in summary[0]
    assert summary[0]["AP"]["mean"] == 12.0


def test_collect_reads_ap_and_the_final_losses_and_names_the_runs_without_results(tmp_path):
    done = accuracy.run_dir(str(tmp_path), "dense/PKD", 0)
    os.makedirs(done)
    with open(os.path.join(done, accuracy.RESULTS_FILE), "w") as f:
        f.write('{"bbox": {"AP": 10.0, "AP50": 20.0, "AP75": 5.0, "APs": 1.0}}')
    with open(os.path.join(done, "metrics.json"), "w") as f:  # as Detectron2's JSONWriter
        f.write('{"iteration": 19, "loss_cls": 0.5, "loss_box_reg": 0.25, "loss_pkd_p3": 3.0}\n')
        f.write('{"iteration": 39, "loss_cls": 0.25, "loss_box_reg": 0.125, "loss_pkd_p3": 1.0,'
                ' "loss_pkd_p4": 0.5, "loss_kd_idle": 0.0, "kd/pcc_p3": 0.8}\n')
        f.write('{"iteration": 40}\n')
    results = accuracy.collect(["dense/PKD"], [0], str(tmp_path))["dense/PKD"][0]
    assert results == {"AP": 10.0, "AP50": 20.0, "AP75": 5.0, "det_loss": 0.375, "kd_loss": 1.5}
    summary = accuracy.summarize({"dense/PKD": {0: results}})
    assert summary[0]["kd_loss"]["mean"] == 1.5
    assert "0.375" in accuracy.format_table(summary)
    with pytest.raises(SystemExit, match="baseline/seed0"):
        accuracy.collect(["dense/PKD", "baseline"], [0], str(tmp_path))
