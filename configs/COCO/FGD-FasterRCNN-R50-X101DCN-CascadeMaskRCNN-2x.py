"""FGD: Faster R-CNN R50 student <- Cascade Mask R-CNN X101-32x4d-DCN teacher, 2x schedule.
LazyConfig twin of FGD-FasterRCNN-R50-X101DCN-CascadeMaskRCNN-2x.yaml (the teacher is the same yacs
config).

Published (COCO val2017 box AP): teacher 47.3, baseline 38.4 -> KD 42.0.
  (arXiv 2111.11837; the authors' fgd_cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x
  _coco.)
Student p2..p5 <-> teacher p2..p5 by index, the R-CNN hyper-parameters and gradients clipped at
norm 35. No inheriting: unlike the authors' RetinaNet config, this one does not set init_student.

Gradient clipping: Detectron2's LazyConfig has no option for it; ``clip_gradients`` (common/
recipe.py) makes the optimizer the clipping SGD subclass that the yacs SOLVER.CLIP_GRADIENTS builds
(each parameter's gradient clipped to norm 35; the authors clip the global norm, which Detectron2
offers in neither config kind). The config saved to the output directory then names that
generated class, which cannot be re-instantiated from the saved file.

  tools/train_net.py --config-file configs/COCO/FGD-FasterRCNN-R50-X101DCN-CascadeMaskRCNN-2x.py \
      --num-gpus 8
"""
from collections import OrderedDict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from pkd.losses import FGDDistiller
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher

from .common.recipe import clip_gradients, dataloader, lr_schedule, optimizer, train

model = L(DistillMetaArch)(
    student=model_zoo.get_config("common/models/mask_rcnn_fpn.py").model,
    teacher=L(load_teacher)(
        config="teachers/CascadeMaskRCNN-X101-32x4d-DCN-1x.yaml",
        # MMDetection's Cascade Mask R-CNN X101-32x4d-DCN converted by tools/convert_teacher.py
        # (see the teacher config for the source checkpoint and the DCN requirement); the path is
        # relative to the working directory.
        weights="output/teachers/cascade_mask_rcnn_x101_dcn_1x.pth",
        device="${...train.device}",
    ),
    # {name: loss module}; a LazyCall, because instantiate() does not descend into plain dicts.
    losses=L(OrderedDict)(
        FGD=L(FGDDistiller)(
            channels=[(256, 256)] * 4,  # (student, teacher) FPN channels of each pair
            temperature=0.5,
            alpha=0.00005,
            beta=0.000025,
            gamma=0.00005,
            lambda_=0.0000005,
        )
    ),
    num_levels=4,
    student_input_format="${..dataloader.train.mapper.image_format}",
    inherit=False,
)
model.student.backbone.bottom_up.freeze_at = 2
# Faster R-CNN: Detectron2's Mask R-CNN FPN model without its mask branch.
for _key in ("mask_in_features", "mask_pooler", "mask_head"):
    del model.student.roi_heads[_key]

optimizer.lr = 0.02
clip_gradients(optimizer, max_norm=35.0)
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/fgd_faster_rcnn_r50_x101dcn_cascade_mask_rcnn_2x_lazy"
