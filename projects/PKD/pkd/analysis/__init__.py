"""Looking at a distillation set-up before training (``tools/check_distill.py``), while it trains
(the blind-teacher check, TensorBoard feature pictures) and after (``tools/report_distill.py``)."""
