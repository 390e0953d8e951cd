#!/usr/bin/env python
"""Train or evaluate a (distilled) Detectron2 detector from a yacs .yaml or a LazyConfig .py.

  tools/train_net.py --config-file configs/PKD-RetinaNet-R50.yaml --num-gpus 8
  tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-R18.py train.max_iter=100
  tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth

Trailing overrides use each config kind's syntax: ``KEY VALUE`` (yacs) or ``key=value`` (.py).
``--eval-only`` evaluates the student alone; the teacher is neither built nor loaded.
"""
from detectron2.engine import default_argument_parser, launch

from pkd.engine import main


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
