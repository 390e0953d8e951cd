"""pkd.export and tools/export_model.py: the exported student detects what the PyTorch student does.

On demo validation images (``pkd_demo_val``), the TorchScript model — loaded with
``torch.jit.load`` in a process that imports neither ``pkd`` nor ``detectron2`` — and the ONNX
model run by onnxruntime return the same detections as the PyTorch student: the same number, the
same classes in the same order, boxes within BOX_TOL_PX pixels and scores within SCORE_TOL.

A randomly initialised detector scores every anchor about the same (RetinaNet/FCOS: the 0.01
prior, below the test threshold; R-CNN: near-uniform softmax), which gives either no detections or
a capped list of near-ties whose order is decided by rounding. So each student is seeded, its
classification layer is re-drawn with a wider spread of logits (RPN objectness too), and its test
score threshold is raised to 0.9 (a config override, exported with the model), which leaves a few
to a few dozen detections per image with no cut at the per-image cap. The checkpoint is saved and
exported like a trained one. ``test_reference_is_meaningful`` checks the premise on every compared
image: detections exist, fewer than the cap, and consecutive scores (and the lowest score and
the threshold) are more than 2 x SCORE_TOL apart, so that differences within tolerance cannot
reorder, add or drop a detection.
"""
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import GeneralizedRCNN

from pkd.checkpoint import CheckpointLoadError
from pkd.data import DEMO_TRAIN, DEMO_VAL, register_demo_datasets
from pkd.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    SPEC_FILE,
    ExportedDetector,
    export_from_config,
    export_student,
    load_student,
    load_student_weights,
    sample_input,
)

from pkd_testing import DEMO, REPO

# Stated tolerance of an exported model against the PyTorch student (also in README "Deploy").
BOX_TOL_PX = 0.01
SCORE_TOL = 1e-5
NUM_IMAGES = 4  # demo val images compared per student (images 1..4; the trace used image 0)

# student kind -> (demo config (the R-CNN one is a distillation config), overrides, the spread
# (std, bias) of the re-drawn classification logits); the meta-architecture is the kind's first
# word. RetinaNet-MobileNetV2: the demo's student on torchvision's ImageNet MobileNetV2 (RGB).
STUDENTS = {
    "RetinaNet": ("RetinaNet-R18.yaml", ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.9"], (0.1, -3.0)),
    "RetinaNet-MobileNetV2": (
        "RetinaNet-MobileNetV2.yaml", ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.9"], (0.1, -3.0)
    ),
    "FCOS": ("FCOS-R18.yaml", ["MODEL.FCOS.SCORE_THRESH_TEST", "0.9"], (0.1, -3.0)),
    "GeneralizedRCNN": (
        "PKD-FasterRCNN-R18.yaml", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.9"], (0.5, 0.0)
    ),
}
EXPORT_TOOL = os.path.join(REPO, "tools", "export_model.py")

# Runs in a fresh interpreter: only torch and torchvision (for the torchvision::nms op).
TORCHSCRIPT_RUNNER = """
import sys
import torch, torchvision
torch.set_num_threads(1)
runs = sys.argv[1:]
for model_file, images, outputs in zip(runs[::3], runs[1::3], runs[2::3]):
    model = torch.jit.load(model_file)
    with torch.no_grad():
        torch.save([tuple(model(image)) for image in torch.load(images)], outputs)
imported = sorted({m.split(".")[0] for m in sys.modules} & {"pkd", "detectron2"})
assert not imported, imported
print("ran without pkd and detectron2")
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in test_configs: tiny inputs, and no stall when another process
    holds one of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_datasets(tmp_path_factory):
    """The demo dataset, built in a temporary directory and registered for this module only."""

    def unregister():
        for name in (DEMO_TRAIN, DEMO_VAL):
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    unregister()
    root = tmp_path_factory.mktemp("datasets")
    register_demo_datasets(str(root / "pkd_demo"))
    yield str(root)
    unregister()


def _spread_logits(model, cls_std: float, cls_bias: float, seed: int = 1) -> None:
    """Re-draws the score layers so that scores spread out (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def redraw(layer, std, bias):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
            layer.bias.fill_(bias)

    if isinstance(model, GeneralizedRCNN):
        redraw(model.proposal_generator.rpn_head.objectness_logits, 0.05, 0.0)
        redraw(model.roi_heads.box_predictor.cls_score, cls_std, cls_bias)
    else:
        redraw(model.head.cls_score, cls_std, cls_bias)
        if hasattr(model.head, "ctrness"):  # FCOS: score = sqrt(sigmoid(cls) * sigmoid(ctr))
            redraw(model.head.ctrness, 0.0, 4.0)


def _score_threshold(model) -> float:
    if isinstance(model, GeneralizedRCNN):
        return model.roi_heads.box_predictor.test_score_thresh
    return model.test_score_thresh


def _pytorch_detections(model, image):
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def assert_same_detections(reference, exported):
    boxes, scores, classes = (torch.as_tensor(np.asarray(x)) for x in exported)
    assert classes.tolist() == reference[2].tolist()
    torch.testing.assert_close(boxes, reference[0], atol=BOX_TOL_PX, rtol=0)
    torch.testing.assert_close(scores, reference[1], atol=SCORE_TOL, rtol=0)


def _seeded_student(kind, directory):
    """The student of STUDENTS[kind], seeded, its logits spread, saved as a checkpoint.

    Returns:
        (config path, overrides, StudentConfig, checkpoint path)
    """
    name, opts, spread = STUDENTS[kind]
    config = os.path.join(DEMO, name)
    student = load_student(config, opts)
    torch.manual_seed(0)
    model = student.build_model()
    _spread_logits(model, *spread)
    weights = os.path.join(directory, "model_final.pth")
    torch.save({"model": model.state_dict()}, weights)
    return config, opts, student, weights


@pytest.fixture(scope="module")
def exports(demo_datasets, tmp_path_factory):
    """For each student kind: both exports of its checkpoint, the PyTorch student loaded from the
    checkpoint, and the student's detections on NUM_IMAGES demo val images."""
    exports = {}
    for kind in sorted(STUDENTS):
        out = str(tmp_path_factory.mktemp(kind))
        config, opts, student, weights = _seeded_student(kind, out)
        dirs = {fmt: os.path.join(out, fmt) for fmt in ("torchscript", "onnx")}
        for fmt, path in dirs.items():
            export_from_config(config, weights, fmt, path, opts=opts)
        model = student.build_model()
        load_student_weights(model, weights)
        loader = student.test_loader(DEMO_VAL)
        inputs = [batch[0] for batch, _ in zip(loader, range(NUM_IMAGES + 1))][1:]
        exports[kind] = {
            "student": student,
            "model": model,
            "dirs": dirs,
            "inputs": inputs,
            "reference": [_pytorch_detections(model, x["image"]) for x in inputs],
        }
    return exports


@pytest.fixture(scope="module")
def torchscript_outputs(exports, tmp_path_factory):
    """Every kind's TorchScript model run on its images by torch.jit.load in a fresh interpreter
    that never imports pkd or detectron2 (one process for all kinds)."""
    out = tmp_path_factory.mktemp("torchscript_runs")
    runs = []
    for kind, e in exports.items():
        images, outputs = out / f"{kind}_images.pt", out / f"{kind}_outputs.pt"
        torch.save([x["image"].float() for x in e["inputs"]], images)
        runs.append((kind, os.path.join(e["dirs"]["torchscript"], "model.ts"), images, outputs))
    args = [str(a) for _, *paths in runs for a in paths]
    proc = subprocess.run(
        # -I: isolated mode, PYTHONPATH (this checkout's pkd) is ignored
        [sys.executable, "-I", "-c", TORCHSCRIPT_RUNNER, *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran without pkd and detectron2" in proc.stdout
    return {kind: torch.load(outputs) for kind, _, _, outputs in runs}


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_reference_is_meaningful(exports, kind):
    e = exports[kind]
    model = e["model"]
    assert type(model).__name__ == kind.split("-")[0]
    cap = ExportedDetector(e["dirs"]["torchscript"]).spec["max_detections_per_image"]
    traced = tuple(sample_input(e["student"])["image"].shape[-2:])
    sizes = {tuple(x["image"].shape[-2:]) for x in e["inputs"]}
    assert sizes - {traced}, "compare on other image sizes than the one traced"
    for boxes, scores, _ in e["reference"]:
        assert 2 <= len(scores) < cap
        assert torch.all(scores[:-1] >= scores[1:])
        gaps = torch.cat([scores[:-1] - scores[1:], scores[-1:] - _score_threshold(model)])
        assert gaps.min() > 2 * SCORE_TOL


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_torchscript_matches_pytorch_in_a_process_without_pkd(exports, torchscript_outputs, kind):
    for reference, out in zip(exports[kind]["reference"], torchscript_outputs[kind], strict=True):
        assert_same_detections(reference, out)


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_onnx_matches_pytorch_in_onnxruntime(exports, kind):
    e = exports[kind]
    path = os.path.join(e["dirs"]["onnx"], "model.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for x, reference in zip(e["inputs"], e["reference"]):
        out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x["image"].float().numpy()})
        assert_same_detections(reference, out)


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_input_spec_describes_the_model(exports, kind):
    e = exports[kind]
    cfg, model = e["student"].cfg, e["model"]
    for fmt, directory in e["dirs"].items():
        with open(os.path.join(directory, SPEC_FILE)) as f:
            spec = json.load(f)
        assert spec["format"] == fmt and os.path.isfile(os.path.join(directory, spec["model_file"]))
        assert spec["meta_architecture"] == kind.split("-")[0]
        (image,) = spec["inputs"]
        assert (image["name"], image["dtype"], image["shape"]) == (
            INPUT_NAME, "float32", [3, "height", "width"]
        )
        assert image["channel_format"] == cfg.INPUT.FORMAT
        assert image["normalization_inside_model"] and not image["resize_inside_model"]
        assert image["pixel_mean"] == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))
        assert image["pixel_std"] == pytest.approx(list(cfg.MODEL.PIXEL_STD))
        assert image["size_divisibility"] == model.backbone.size_divisibility
        assert f"max_size={cfg.INPUT.MAX_SIZE_TEST}" in image["preprocessing_outside_model"][0]
        assert [o["name"] for o in spec["outputs"]] == list(OUTPUT_NAMES)
        assert spec["class_names"] == ["coin", "cat", "cup"]
        assert spec["check_on_sample"]["same_count_and_classes"]


def test_export_tool_and_the_exported_coco_evaluation(demo_datasets, tmp_path):
    """tools/export_model.py end to end on a distillation config (its RetinaNet student, traced on
    the config's first test image), with --run-eval: evaluate_exported scores the exported
    model's own detections on the whole val set, and they are Detectron2's evaluation of the
    PyTorch student, detection by detection."""
    _, opts, _, _ = _seeded_student("RetinaNet", str(tmp_path))
    config = os.path.join(DEMO, "PKD-RetinaNet-R18.yaml")  # its student is RetinaNet-R18.yaml
    weights = str(tmp_path / "model_final.pth")
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, EXPORT_TOOL, "--config-file", config, "--weights", weights,
         "--format", "torchscript", "--output", str(out), "--run-eval", *opts],
        env=dict(os.environ, DETECTRON2_DATASETS=demo_datasets, OMP_NUM_THREADS="1"),
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["meta_architecture"] == "RetinaNet"
    assert spec["config_file"] == config and spec["weights"] == weights

    student = load_student(config, opts)
    model = student.build_model()
    load_student_weights(model, weights)
    pytorch = inference_on_dataset(
        model, student.test_loader(DEMO_VAL),
        COCOEvaluator(DEMO_VAL, output_dir=str(tmp_path / "pytorch")),
    )
    detections = {}
    for name, directory in (("exported", out), ("pytorch", tmp_path / "pytorch")):
        with open(directory / "coco_instances_results.json") as f:
            detections[name] = json.load(f)
    assert len(detections["exported"]) == len(detections["pytorch"]) > 0
    for a, b in zip(detections["exported"], detections["pytorch"]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        # boxes are scaled from the resized input back to the original image (factor <= 1.2)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1.2 * BOX_TOL_PX)
        assert a["score"] == pytest.approx(b["score"], abs=SCORE_TOL)
    exported_results = json.loads((out / "eval_results.json").read_text())
    assert exported_results["bbox"]["AP"] == pytest.approx(pytorch["bbox"]["AP"], abs=1e-3)


def test_export_from_a_lazy_config(demo_datasets, tmp_path):
    """The LazyConfig twin of a distillation config exports its student the same way."""
    config = os.path.join(DEMO, "PKD-RetinaNet-R18.py")
    opts = ["model.student.test_score_thresh=0.9"]
    student = load_student(config, opts)
    torch.manual_seed(0)
    model = student.build_model()
    _spread_logits(model, *STUDENTS["RetinaNet"][2])
    torch.save({"model": model.state_dict()}, tmp_path / "model_final.pth")
    export_from_config(config, str(tmp_path / "model_final.pth"), "torchscript",
                       str(tmp_path / "ts"), opts=opts)
    spec = json.loads((tmp_path / "ts" / SPEC_FILE).read_text())
    assert spec["meta_architecture"] == "RetinaNet"
    assert spec["inputs"][0]["channel_format"] == "BGR"
    assert "max_size=192" in spec["inputs"][0]["preprocessing_outside_model"][0]
    check = spec["check_on_sample"]
    assert check["same_count_and_classes"]
    assert check["max_box_diff_px"] <= BOX_TOL_PX and check["max_score_diff"] <= SCORE_TOL
    sample = sample_input(student)
    reference = _pytorch_detections(model, sample["image"])
    assert len(reference[1]) >= 2
    assert_same_detections(reference, ExportedDetector(str(tmp_path / "ts")).detect(sample["image"]))


def test_export_refuses_a_checkpoint_that_does_not_cover_the_student(demo_datasets, tmp_path):
    student = load_student(os.path.join(DEMO, "RetinaNet-R18.yaml"))
    model = student.build_model()
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("head.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointLoadError, match=r"does not fit the student.*head\."):
        load_student_weights(model, str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_student_weights(model, str(tmp_path / "nowhere.pth"))


def test_export_refuses_an_unsupported_model(demo_datasets, tmp_path):
    student = load_student(os.path.join(DEMO, "RetinaNet-R18.yaml"))
    sample = sample_input(student)
    with pytest.raises(TypeError, match="RetinaNet, FCOS .* GeneralizedRCNN"):
        export_student(torch.nn.Linear(2, 2), sample, "torchscript", str(tmp_path),
                       image_format="BGR")
    with pytest.raises(ValueError, match="Unknown export format 'tflite'"):
        export_student(student.build_model(), sample, "tflite", str(tmp_path), image_format="BGR")
