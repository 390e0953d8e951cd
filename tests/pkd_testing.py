"""Shared helpers of the test suite: tiny real Detectron2 configs, batches and datasets."""
import json
import os
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from pkd.config import get_distill_cfg
from pkd.engine import main as train_net_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
DEMO = os.path.join(CONFIGS, "Demo")
TEACHER_YAML = os.path.join(DEMO, "FasterRCNN-R18-teacher.yaml")
# The demo teacher with a slimmer box head (exercises TEACHER.OPTS, keeps the tests fast).
TINY_TEACHER_OPTS = ["MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
TINY_INPUT = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
              "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]

DISTILL_CONFIGS = {
    "RetinaNet": "PKD-RetinaNet-R18.yaml",
    "FCOS": "PKD-FCOS-R18.yaml",
    "GeneralizedRCNN": "PKD-FasterRCNN-R18.yaml",
}


def distill_cfg(student: str = "RetinaNet", opts: Sequence[str] = ()):
    """A distillation config from configs/Demo with a random ResNet-18 teacher."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(DEMO, DISTILL_CONFIGS[student]))
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "random"
    cfg.MODEL.DISTILL.TEACHER.OPTS = list(TINY_TEACHER_OPTS)
    cfg.merge_from_list(list(opts))
    return cfg


def build_seeded(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def make_batch(
    sizes: Sequence[Tuple[int, int]] = ((67, 91), (80, 64)),
    boxes_per_image: Sequence[int] = (3, 0),
    num_classes: int = 3,
    seed: int = 0,
) -> List[dict]:
    """Detectron2 training inputs: uint8-valued float images (C, H, W) and random GT boxes;
    odd sizes and images without boxes by default."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for (h, w), n in zip(sizes, boxes_per_image):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


# A tiny dataset a teacher learns in seconds, where the channel order matters: red and blue
# squares on grey (a teacher fed RGB instead of BGR sees every red square as blue).
SQUARES = "pkd_squares"  # registered as both training and test set by the `squares` fixture
SQUARES_CLASSES = ("red", "blue")
_SQUARE_BGR = ((0, 0, 230), (230, 0, 0))
RETINA_YAML = os.path.join(DEMO, "RetinaNet-R18.yaml")
# The squares teacher: the demo RetinaNet-R18 at 64-96 px with two classes.
SQUARES_MODEL = TINY_INPUT + ["MODEL.RETINANET.NUM_CLASSES", "2"]


def build_squares_dataset(root: str, num_images: int = 8, seed: int = 0) -> Tuple[str, str]:
    """Writes ``root/images/*.png`` (64-96 px, 1-3 red or blue squares of 14-31 px on noisy grey)
    and ``root/squares.json`` (COCO); returns (json path, image dir)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        h, w = (int(v) for v in rng.integers(64, 97, size=2))
        image = (128 + rng.integers(-20, 20, (h, w, 3))).astype(np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(20):
                bw, bh = (int(v) for v in rng.integers(14, 32, size=2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                if all(x + bw <= bx or bx + bbw <= x or y + bh <= by or by + bbh <= y
                       for bx, by, bbw, bbh, _ in boxes):
                    label = int(rng.integers(len(SQUARES_CLASSES)))
                    image[y:y + bh, x:x + bw] = _SQUARE_BGR[label]
                    boxes.append((x, y, bw, bh, label))
                    break
        file_name = f"{index:03d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image)
        images.append({"id": index + 1, "file_name": file_name, "height": h, "width": w})
        for x, y, bw, bh, label in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                                "category_id": label + 1})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(SQUARES_CLASSES)]
    json_path = os.path.join(root, "squares.json")
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_path, image_dir


def squares_cfg(config: str = RETINA_YAML, opts: Sequence[str] = ()):
    """A config on the squares dataset (training and test set), tiny input, no workers."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(SQUARES_MODEL + [
        "DATASETS.TRAIN", f"('{SQUARES}',)", "DATASETS.TEST", f"('{SQUARES}',)",
        "DATALOADER.NUM_WORKERS", "0", *opts,
    ])
    return cfg


def squares_distill_cfg(teacher_weights: str, opts: Sequence[str] = ()):
    """The demo RetinaNet-R18 student distilled with PKD from the squares teacher (p3..p6 pairs)."""
    return squares_cfg(os.path.join(DEMO, "PKD-RetinaNet-R18.yaml"), [
        "MODEL.DISTILL.TEACHER.CONFIG", RETINA_YAML,
        "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights,
        "MODEL.DISTILL.TEACHER.OPTS", str(SQUARES_MODEL),
        "SOLVER.IMS_PER_BATCH", "2", *opts,
    ])


def train_in_process(output_dir, cfg):
    """``tools/train_net.py --config-file <cfg saved as yaml>`` in this process (so datasets
    registered here are seen); returns ``output_dir``."""
    cfg.OUTPUT_DIR = str(output_dir)
    config = f"{output_dir}.yaml"
    with open(config, "w") as f:
        f.write(cfg.dump())
    train_net_main(default_argument_parser().parse_args(["--config-file", config]))
    return output_dir


def lazy_squares_distill_cfg(teacher_weights: str, output_dir):
    """LazyConfig twin of :func:`squares_distill_cfg` (configs/Demo/PKD-RetinaNet-R18.py), one
    iteration."""
    cfg = LazyConfig.load(os.path.join(DEMO, "PKD-RetinaNet-R18.py"))
    cfg.model.teacher.config = RETINA_YAML
    cfg.model.teacher.weights = teacher_weights
    cfg.model.teacher.opts = list(SQUARES_MODEL)
    cfg.model.student.num_classes = 2
    for split in ("train", "test"):
        cfg.dataloader[split].dataset.names = SQUARES
        cfg.dataloader[split].num_workers = 0
        cfg.dataloader[split].mapper.augmentations[0].short_edge_length = 64
        cfg.dataloader[split].mapper.augmentations[0].max_size = 96
    cfg.dataloader.train.total_batch_size = 2
    cfg.train.max_iter = 1
    cfg.train.output_dir = str(output_dir)
    return cfg
