#!/usr/bin/env python
"""COCO-evaluate a checkpoint with plain Detectron2 — its own ``get_cfg``/``build_model`` and a
strict ``load_state_dict``, no distillation code — to show that a distilled student's
``model_final.pth`` deploys as it is. The only ``pkd`` import is the one a plain script needs for
a torchvision backbone (it registers the backbone builders and adds ``MODEL.TORCHVISION``).

  tools/plain_eval.py --config-file configs/Demo/RetinaNet-R18.yaml \
      --weights output/demo/student_pkd/model_final.pth \
      --dataset pkd_demo_val datasets/pkd_demo/annotations/instances_val.json datasets/pkd_demo/val

Prints the COCO table and, with ``--json``, writes the results there.
"""
import argparse
import json

import torch
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

# The one import a plain Detectron2 script needs for a torchvision backbone (README).
from pkd.modeling.torchvision_backbone import add_torchvision_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="the plain student's yacs config")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", nargs=3, metavar=("NAME", "JSON", "IMAGE_DIR"), required=True)
    parser.add_argument("--json", help="write the evaluation results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="detectron2")
    name, json_file, image_dir = args.dataset
    register_coco_instances(name, {}, json_file, image_dir)
    cfg = get_cfg()
    add_torchvision_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.DATASETS.TEST = (name,)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    model = build_model(cfg).eval()
    # strict=True: every key of the student, nothing else (no teacher, no KD modules).
    state = torch.load(args.weights, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    print(f"[plain_eval] {args.weights}: {len(state)} tensors, no missing or unexpected keys")
    results = DefaultTrainer.test(cfg, model, [COCOEvaluator(name, output_dir=None)])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
