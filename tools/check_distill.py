#!/usr/bin/env python
"""Is a distillation set-up sound, before training? Scores the teacher (box AP through its own
data path and through the distiller's), measures each feature pair and each loss term's gradient
against the detection losses', prints a report and writes check_distill.json.

  tools/check_distill.py --config-file configs/Demo/PKD-RetinaNet-R18.yaml [--num-images 8]
  tools/check_distill.py --config-file configs/Demo/PKD-RetinaNet-R18.py [key=value ...]

Exit status 0 when sound (warnings may be printed), 1 when a check fails. See pkd/analysis/check.py.
"""
import sys

from pkd.analysis.check import main

if __name__ == "__main__":
    sys.exit(main())
