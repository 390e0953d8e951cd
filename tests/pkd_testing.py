"""Shared helpers of the test suite: tiny real Detectron2 configs and batches."""
import os
from typing import List, Sequence, Tuple

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from pkd.config import get_distill_cfg

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
