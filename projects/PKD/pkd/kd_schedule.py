"""The distillation weight schedule: a linear warm-up of every distillation term from 0, and an
iteration from which distillation is off (as mmrazor's StopDistillHook does per epoch).

The factor is a pure function of the iteration number, which Detectron2's event storage holds and
``--resume`` restores, so a resumed run follows the same schedule as an uninterrupted one."""

__all__ = ["kd_weight_scale", "check_kd_schedule"]


def check_kd_schedule(warmup_iters: int, stop_iter: int) -> None:
    """Raises a ValueError naming the setting if either value is negative."""
    for name, value in (("WARMUP_ITERS", warmup_iters), ("STOP_ITER", stop_iter)):
        if int(value) != value or value < 0:
            raise ValueError(
                f"MODEL.DISTILL.{name} (LazyConfig: {name.lower()}) must be an integer >= 0, got "
                f"{value}; 0 turns it off."
            )


def kd_weight_scale(iteration: int, warmup_iters: int = 0, stop_iter: int = 0) -> float:
    """The factor every distillation term is multiplied by at ``iteration`` (0-based).

    Args:
        warmup_iters: W > 0: the factor grows linearly from 0 at iteration 0 to 1 at iteration W
            (``iteration / W``); 0: no warm-up.
        stop_iter: S > 0: the factor is 0 from iteration S on, i.e. distillation is off and the
            teacher does not run; 0: distillation never stops.

    Returns:
        a float in [0, 1]; 0 means the distiller trains the student alone at this iteration.
    """
    if stop_iter > 0 and iteration >= stop_iter:
        return 0.0
    if warmup_iters > 0 and iteration < warmup_iters:
        return iteration / warmup_iters
    return 1.0
