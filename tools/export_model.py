#!/usr/bin/env python
"""Export the student of a distillation config (or a plain student config) for deployment, through
Detectron2's ``detectron2.export`` (TracingAdapter): TorchScript or ONNX, with ``input_spec.json``
(input format, preprocessing, output names) beside the model.

  tools/export_model.py --config-file configs/Demo/PKD-RetinaNet-R18.yaml \
      --weights output/demo/student_pkd/model_final.pth --format torchscript \
      --output output/demo/student_pkd/torchscript [--sample-image IMAGE] [--run-eval]

The model is traced on ``--sample-image``, else on the first image of the config's test dataset,
after the config's test-time resize. ``--run-eval`` COCO-evaluates the exported model's own outputs
on that dataset and writes ``eval_results.json`` into ``--output``. Trailing overrides use the
config kind's syntax (``KEY VALUE`` for .yaml, ``key=value`` for .py). See README "Deploy".
"""
import argparse
import json
import os

from detectron2.evaluation import print_csv_format
from detectron2.utils.logger import setup_logger

from pkd.export import FORMATS, evaluate_exported, export_from_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, help="the trained student's checkpoint")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--output", required=True, help="directory for the model and its spec")
    parser.add_argument("--sample-image", help="image to trace with (default: first test image)")
    parser.add_argument("--run-eval", action="store_true",
                        help="COCO-evaluate the exported model on the config's test dataset")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="pkd")
    setup_logger(name="detectron2")
    path = export_from_config(args.config_file, args.weights, args.format, args.output,
                              args.sample_image, args.opts)
    print(f"[export_model] wrote {path} and {os.path.join(args.output, 'input_spec.json')}")
    if args.run_eval:
        results = evaluate_exported(args.output, args.config_file, opts=args.opts,
                                    output_dir=args.output)
        print_csv_format(results)
        with open(os.path.join(args.output, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
