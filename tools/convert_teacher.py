#!/usr/bin/env python
"""Convert a published MMDetection teacher checkpoint into a Detectron2 checkpoint.

  tools/convert_teacher.py mask_rcnn_swin-s.pth output/teachers/swin_s.pth \
      --config configs/teachers/MaskRCNN-SwinS.yaml
  tools/convert_teacher.py fcos_x101.pth output/teachers/fcos_x101.pth \
      --config configs/teachers/FCOS-X101.yaml --with-head --drop-fcos-scales

Converts the backbone and FPN (and the dense head with ``--with-head``) by naming rules, fails on
any tensor it cannot place, and with ``--config`` checks the result against the teacher model
that config builds. Prints what was converted, skipped by choice and synthesized. The result is
what ``MODEL.DISTILL.TEACHER.WEIGHTS`` expects. Rules and limitations: ``pkd/convert.py``.
"""
import argparse
import sys

from pkd.checkpoint import CheckpointLoadError
from pkd.convert import ConversionError, convert_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="MMDetection checkpoint (.pth with 'state_dict')")
    parser.add_argument("out", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--config", help="teacher config (.yaml/.py) to validate against")
    parser.add_argument("--opts", nargs="*", default=[], help="overrides for --config")
    parser.add_argument("--with-head", action="store_true", help="also convert the dense head")
    parser.add_argument(
        "--drop-fcos-scales",
        action="store_true",
        help="convert an FCOS head although Detectron2 has no per-level scales",
    )
    parser.add_argument(
        "--fpn-first-level",
        type=int,
        help="Detectron2 level of the first FPN lateral (2: from res2, 3: from res3); "
        "inferred by default",
    )
    parser.add_argument(
        "--anchor-grid",
        type=int,
        nargs=2,
        default=(3, 3),
        metavar=("SIZES", "RATIOS"),
        help="RetinaNet anchors per location (default: 3 sizes x 3 ratios)",
    )
    args = parser.parse_args(argv)
    try:
        report = convert_teacher(
            args.src,
            args.out,
            config=args.config,
            opts=args.opts,
            with_head=args.with_head,
            drop_fcos_scales=args.drop_fcos_scales,
            fpn_first_level=args.fpn_first_level,
            anchor_grid=tuple(args.anchor_grid),
        )
    except (ConversionError, CheckpointLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"Wrote {args.out}" + (f" (checked against {args.config})" if args.config else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
