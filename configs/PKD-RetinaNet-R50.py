"""Headline PKD recipe: RetinaNet R50 student <- Mask R-CNN Swin-S teacher, 2x schedule.
LazyConfig twin of PKD-RetinaNet-R50.yaml.

Published (COCO val2017 box AP): teacher 48.2, baseline 37.4 -> KD 41.5.
Everything (recipe, teacher, weights path, how to get them) is in the COCO config loaded below.

  tools/train_net.py --config-file configs/PKD-RetinaNet-R50.py --num-gpus 8
"""
from detectron2.config import LazyConfig

dataloader, lr_multiplier, model, optimizer, train = LazyConfig.load_rel(
    "COCO/PKD-RetinaNet-R50-SwinS-MaskRCNN-2x.py",
    ("dataloader", "lr_multiplier", "model", "optimizer", "train"),
)
