#!/usr/bin/env python
"""What did distillation do? Writes one self-contained HTML page for a finished run: AP against a
baseline run, training curves, teacher/student feature maps at the final checkpoint and the
per-channel correlation with the teacher.

  tools/report_distill.py output/demo/student_pkd --baseline output/demo/student [--out DIR]

Trailing KEY VALUE / key=value pairs override the run's saved config.yaml. See
pkd/analysis/report.py.
"""
from pkd.analysis.report import main

if __name__ == "__main__":
    main()
