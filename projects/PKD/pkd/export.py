"""Deploying a (distilled) student: export it through ``detectron2.export`` to TorchScript or ONNX,
write the input spec beside it, and run or COCO-evaluate the exported file.

The student is the plain Detectron2 model of a distillation config (``MODEL.DISTILL.STUDENT_ARCH``)
or of a plain config, yacs or LazyConfig. It is traced with Detectron2's :class:`TracingAdapter`
on one preprocessed image: the exported graph takes that image as one float32 ``(3, H, W)``
tensor (any H, W) and runs everything after the data loader's resize — normalisation, padding
to the backbone's size divisibility, backbone, head, box decoding, NMS — and returns three
tensors, named after the fields of Detectron2's ``Instances``: ``pred_boxes`` (N, 4) XYXY in
input-image pixels, ``scores`` (N,) in decreasing order, ``pred_classes`` (N,) int64.

The graph is backbone-agnostic: anything Detectron2's ``build_model`` builds and ``torch.jit.trace``
can follow (ResNet, torchvision classification trunks under FPN, ...) exports the same way.
``tools/export_model.py`` is the command-line front end.
"""
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.export import TracingAdapter, dump_torchscript_IR
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .checkpoint import StrictCheckpointer
from .engine import build_student_for_eval
from .run_config import is_lazy, load_config, register_builtin_datasets, test_dataset, test_mapper

__all__ = [
    "FORMATS",
    "MODEL_FILES",
    "SPEC_FILE",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "ONNX_OPSET",
    "StudentConfig",
    "load_student",
    "sample_input",
    "export_student",
    "export_from_config",
    "input_spec",
    "check_export",
    "load_student_weights",
    "ExportedDetector",
    "evaluate_exported",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
SPEC_FILE = "input_spec.json"
INPUT_NAME = "image"
OUTPUT_NAMES = ("pred_boxes", "scores", "pred_classes")
# Opset 17 covers everything the traced detectors use (NonMaxSuppression, RoiAlign, TopK).
ONNX_OPSET = 17


@dataclass
class StudentConfig:
    """A student's config as the export needs it.

    Attributes:
        cfg: the yacs CfgNode or LazyConfig of the config file; for a distillation config,
            :meth:`build_model` builds its student (``MODEL.DISTILL.STUDENT_ARCH`` / ``student``).
        config_file: the file it was loaded from.
    """

    cfg: Any
    config_file: str

    @property
    def is_lazy(self) -> bool:
        return is_lazy(self.cfg)

    def build_model(self) -> nn.Module:
        """The student alone (a teacher is neither built nor loaded), on CPU, in eval mode."""
        return build_student_for_eval(self.cfg).eval()

    def mapper(self) -> DatasetMapper:
        """The test-time DatasetMapper: reads a file in the input format and resizes it."""
        return test_mapper(self.cfg)

    @property
    def test_dataset(self) -> Optional[str]:
        return test_dataset(self.cfg)

    def test_loader(self, dataset: str):
        """Detectron2's test loader of ``dataset`` with this config's mapper (batch size 1)."""
        register_builtin_datasets([dataset])
        return build_detection_test_loader(
            DatasetCatalog.get(dataset), mapper=self.mapper(), num_workers=0
        )


def load_student(config_file: str, opts: Sequence[str] = ()) -> StudentConfig:
    """Loads a distillation or plain config (``.yaml``: ``KEY VALUE`` opts; ``.py``:
    ``key=value`` opts) for export on CPU."""
    cfg = load_config(config_file, opts)
    if not is_lazy(cfg):
        cfg.MODEL.DEVICE = "cpu"
    elif "train" in cfg:
        cfg.train.device = "cpu"
    return StudentConfig(cfg=cfg, config_file=config_file)


def load_student_weights(model: nn.Module, weights: str) -> None:
    """Loads a student checkpoint (Detectron2 formats, loaded safely) strictly into ``model``."""
    if not weights or ("://" not in weights and not os.path.isfile(weights)):
        raise FileNotFoundError(
            f"Student checkpoint '{weights}' does not exist: pass the trained student's weights "
            "(e.g. OUTPUT_DIR/model_final.pth of the distillation run)."
        )
    StrictCheckpointer(
        model,
        subject="the student",
        fix="Export the checkpoint trained with this config (a distillation run's "
        "model_final.pth holds exactly the student).",
    ).load(weights, checkpointables=[])


def sample_input(student: StudentConfig, image_file: Optional[str] = None) -> Dict[str, Any]:
    """One test-time input (``{"image": (3, H, W) float32, "height", "width"}``) prepared by the
    config's own mapper: from ``image_file``, else the first image of the config's test set."""
    if image_file is None:
        dataset = student.test_dataset
        if dataset is None:
            raise ValueError(
                f"{student.config_file} names no test dataset: give a sample image "
                "(--sample-image) to trace the model with."
            )
        register_builtin_datasets([dataset])
        record = DatasetCatalog.get(dataset)[0]
        image_file = record["file_name"]
    inputs = student.mapper()({"file_name": image_file})
    inputs["image"] = inputs["image"].float()
    return inputs


def _detections(model: nn.Module, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The model's detections on one preprocessed image, as the exported graph returns them."""
    instances = model([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, (DenseDetector, GeneralizedRCNN)):
        raise TypeError(
            f"Cannot export a {type(model).__name__}: export supports the detectors distillation "
            "trains, RetinaNet, FCOS (any DenseDetector) and GeneralizedRCNN (Faster R-CNN; boxes "
            "only)."
        )


def export_student(
    model: nn.Module,
    sample: Dict[str, Any],
    fmt: str,
    output_dir: str,
    *,
    image_format: str,
    preprocessing: Sequence[str] = (),
    spec_extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Traces ``model`` with Detectron2's TracingAdapter on ``sample`` and writes
    ``output_dir/model.ts`` (TorchScript, plus Detectron2's IR dumps) or ``model.onnx``, and
    ``output_dir/input_spec.json``.

    Args:
        model: a RetinaNet / FCOS / GeneralizedRCNN in eval mode, on CPU.
        sample: a test-time input from :func:`sample_input`.
        fmt: "torchscript" or "onnx".
        image_format: the channel order of the images the model was trained on (INPUT.FORMAT).
        preprocessing: what the data loader does before the model (the mapper's augmentations).
        spec_extra: more entries for the spec (e.g. the source config and weights).

    Returns:
        the path of the exported model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format '{fmt}': choose one of {FORMATS}.")
    _check_exportable(model)
    model.eval()
    image = sample["image"]
    # eval() on the adapter too: the ONNX exporter restores the mode of the module it is given.
    adapter = TracingAdapter(model, image, _detections).eval()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    with warnings.catch_warnings():
        # Python-side shape checks in Detectron2's code become constants of the graph; they are
        # asserts and static branches, which is what TracerWarnings are about.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
            torch.jit.save(traced, path)
            dump_torchscript_IR(traced, os.path.join(output_dir, "torchscript_ir"))
        else:
            dynamic = {INPUT_NAME: {1: "height", 2: "width"}}
            dynamic.update({name: {0: "num_detections"} for name in OUTPUT_NAMES})
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            # The detectors index with topk/nonzero/NMS results, which are never negative.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            # The TorchScript-based exporter follows TracingAdapter's trace, data-dependent NMS
            # included; torch.export (dynamo=True) cannot, on Detectron2's Python control flow.
            torch.onnx.export(
                adapter,
                (image,),
                path,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
            )
    spec = input_spec(model, fmt, sample, image_format, preprocessing)
    spec.update(spec_extra or {})
    _write_spec(output_dir, spec)
    logger.info(f"Exported {type(model).__name__} to {path}; input spec: {SPEC_FILE}")
    return path


def _write_spec(output_dir: str, spec: Dict[str, Any]) -> None:
    with open(os.path.join(output_dir, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=2)


def input_spec(
    model: nn.Module,
    fmt: str,
    sample: Dict[str, Any],
    image_format: str,
    preprocessing: Sequence[str] = (),
) -> Dict[str, Any]:
    """What a deployment needs to feed the exported model and read its outputs."""
    return {
        "format": fmt,
        "model_file": MODEL_FILES[fmt],
        "meta_architecture": type(model).__name__,
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": [3, "height", "width"],
                "layout": "CHW, one image per call (no batch dimension)",
                "channel_format": image_format,
                "value_range": "0..255 (pixel values, not scaled to 0..1)",
                "normalization_inside_model": True,
                "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
                "pixel_std": [float(v) for v in model.pixel_std.flatten()],
                "resize_inside_model": False,
                "preprocessing_outside_model": list(preprocessing),
                "size_divisibility": int(model.backbone.size_divisibility),
                "size_constraints": "any height and width; the model pads them to a multiple of "
                "size_divisibility itself",
                "traced_with_size": list(sample["image"].shape[-2:]),
            }
        ],
        "outputs": [
            {"name": "pred_boxes", "dtype": "float32", "shape": ["num_detections", 4],
             "meaning": "boxes (x0, y0, x1, y1) in the input image's pixels; multiply by "
             "original/input size to map them to the original image"},
            {"name": "scores", "dtype": "float32", "shape": ["num_detections"],
             "meaning": "detection confidence, in decreasing order"},
            {"name": "pred_classes", "dtype": "int64", "shape": ["num_detections"],
             "meaning": "0-based contiguous class index (into class_names)"},
        ],
        "max_detections_per_image": _max_detections(model),
        "runtime": (
            "torch.jit.load after `import torchvision` (it registers the torchvision::nms op); "
            "neither detectron2 nor pkd is needed"
            if fmt == "torchscript"
            else f"onnxruntime (ONNX opset {ONNX_OPSET}); neither torch nor detectron2 is needed"
        ),
    }


def _max_detections(model: nn.Module) -> int:
    if isinstance(model, GeneralizedRCNN):
        return int(model.roi_heads.box_predictor.test_topk_per_image)
    return int(model.max_detections_per_image)


def export_from_config(
    config_file: str,
    weights: str,
    fmt: str,
    output_dir: str,
    sample_image: Optional[str] = None,
    opts: Sequence[str] = (),
) -> str:
    """``tools/export_model.py``: the student of ``config_file`` with ``weights``, exported.

    Returns:
        the path of the exported model.
    """
    student = load_student(config_file, opts)
    model = student.build_model()
    load_student_weights(model, weights)
    sample = sample_input(student, sample_image)
    mapper = student.mapper()
    extra = {
        "config_file": os.path.abspath(config_file),
        "weights": os.path.abspath(weights) if "://" not in weights else weights,
        "class_names": _class_names(student.test_dataset),
    }
    path = export_student(
        model,
        sample,
        fmt,
        output_dir,
        image_format=mapper.image_format,
        preprocessing=[repr(a) for a in mapper.augmentations.augs],
        spec_extra=extra,
    )
    exported = ExportedDetector(output_dir)
    exported.spec["check_on_sample"] = check_export(model, exported, [sample])
    _write_spec(output_dir, exported.spec)
    logger.info(f"Exported model vs PyTorch on the sample image: {exported.spec['check_on_sample']}")
    return path


def _class_names(dataset: Optional[str]) -> Optional[List[str]]:
    if dataset is None:
        return None
    register_builtin_datasets([dataset])
    return MetadataCatalog.get(dataset).get("thing_classes")


class ExportedDetector:
    """An exported model behind Detectron2's model interface (a list of mapped inputs in, a list
    of ``{"instances": Instances}`` out, boxes in each input's ``height``/``width``), so that
    Detectron2's ``inference_on_dataset`` and evaluators run it as they run the PyTorch model."""

    def __init__(self, output_dir: str, onnx_threads: Optional[int] = None):
        """
        Args:
            output_dir: where :func:`export_student` wrote the model and its spec.
            onnx_threads: onnxruntime's intra-op threads (default: its own choice). TorchScript
                uses torch's setting (``torch.set_num_threads``).
        """
        with open(os.path.join(output_dir, SPEC_FILE)) as f:
            self.spec = json.load(f)
        self.format = self.spec["format"]
        path = os.path.join(output_dir, self.spec["model_file"])
        if self.format == "torchscript":
            import torchvision  # noqa: F401  (registers torchvision::nms for the loaded graph)

            self._model = torch.jit.load(path, map_location="cpu")
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if onnx_threads:
                options.intra_op_num_threads = onnx_threads
            self._session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )

    def detect(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``image``: (3, H, W), values as the spec says. Returns (pred_boxes, scores,
        pred_classes) in the input image's pixels."""
        image = image.float()  # a DatasetMapper's images are uint8
        if self.format == "torchscript":
            with torch.no_grad():
                return tuple(self._model(image))
        outputs = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)

    def __call__(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Instances]]:
        results = []
        for x in batched_inputs:
            image = x["image"]
            boxes, scores, classes = self.detect(image)
            instances = Instances(tuple(image.shape[-2:]))
            instances.pred_boxes = Boxes(boxes)
            instances.scores = scores
            instances.pred_classes = classes
            height, width = x.get("height", image.shape[-2]), x.get("width", image.shape[-1])
            results.append({"instances": detector_postprocess(instances, height, width)})
        return results


def check_export(
    model: nn.Module, exported: ExportedDetector, samples: Sequence[Dict[str, Any]]
) -> Dict[str, Any]:
    """Largest differences between the PyTorch model's detections and the exported model's on
    ``samples`` (same number of detections in the same order is required for the box/score
    differences to be meaningful: ``same_count``)."""
    box_diff = score_diff = 0.0
    same = True
    for sample in samples:
        with torch.no_grad():
            ref = _detections(model, sample["image"])
        out = exported.detect(sample["image"])
        if ref[0].shape != out[0].shape or not torch.equal(ref[2], out[2]):
            same = False
            continue
        if len(ref[0]):
            box_diff = max(box_diff, (ref[0] - out[0]).abs().max().item())
            score_diff = max(score_diff, (ref[1] - out[1]).abs().max().item())
    return {"same_count_and_classes": same, "max_box_diff_px": box_diff,
            "max_score_diff": score_diff}


def evaluate_exported(
    export_dir: str,
    config_file: str,
    dataset: Optional[str] = None,
    output_dir: Optional[str] = None,
    opts: Sequence[str] = (),
) -> Dict[str, Any]:
    """COCO-evaluates the exported model in ``export_dir`` on ``dataset`` (default: the config's
    test set), fed by the config's own test-time mapper; the detections are the exported
    model's own outputs, scaled back to each image's original size.

    Returns:
        Detectron2's results dict, ``{"bbox": {"AP": ..., "AP50": ..., ...}}``; with
        ``output_dir``, COCOEvaluator also writes ``coco_instances_results.json`` there.
    """
    student = load_student(config_file, opts)
    dataset = dataset or student.test_dataset
    if dataset is None:
        raise ValueError(f"{config_file} names no test dataset: pass the dataset to evaluate on.")
    loader = student.test_loader(dataset)
    evaluator = COCOEvaluator(dataset, output_dir=output_dir)
    return inference_on_dataset(ExportedDetector(export_dir), loader, evaluator)
