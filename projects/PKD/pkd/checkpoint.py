"""Checkpoint layout and safe loading.

* The ``"model"`` entry of every checkpoint training writes is the *student* alone, under the plain
  student's key names, so ``model_final.pth`` loads into plain Detectron2 with no conversion.
* Trainable distillation modules (adapters, FGD context blocks) are saved apart, under
  ``"distill_losses"``; ``"resume_state"`` keeps what an exact ``--resume`` needs beyond
  Detectron2's own entries (RNG states, the student's loss-normalizer EMA). The teacher is never
  saved. :func:`pkd.engine.build_checkpointer` assembles this layout for training.
* Loading never executes code from a file unless explicitly allowed: torch files are read with
  ``weights_only=True``; Detectron2/Caffe2 ``.pkl`` files (pickled numpy arrays) are first
  checked with an unpickler that only accepts numpy arrays and plain containers.
"""
import io
import logging
import os
import pickle
from typing import Sequence

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = [
    "DistillCheckpointer",
    "StrictCheckpointer",
    "CheckpointLoadError",
    "load_torch_file",
    "UNSAFE_LOAD_ENV",
]

logger = logging.getLogger(__name__)

# Set to 1 to let checkpoints run arbitrary pickled code when loaded (only for files you trust).
UNSAFE_LOAD_ENV = "PKD_ALLOW_UNSAFE_CHECKPOINTS"


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read, is refused, or does not fit the model."""


def _unsafe_allowed() -> bool:
    return os.environ.get(UNSAFE_LOAD_ENV, "") == "1"


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle references a global that is not on the allow-list."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Accepts what Detectron2/Caffe2 model-zoo ``.pkl`` files hold: dicts, lists, numbers,
    strings and numpy arrays. Anything else (e.g. ``os.system``) is refused, not called."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("_codecs", "encode"),  # numpy arrays pickled by Python 2 store bytes this way
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"it references '{module}.{name}'")


def check_pickle_is_safe(path: str) -> None:
    """Parses a ``.pkl`` with :class:`_NumpyOnlyUnpickler`; raises CheckpointLoadError if it
    references anything but numpy arrays and plain containers, or is unreadable."""
    with PathManager.open(path, "rb") as f:
        data = f.read()
    try:
        _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise CheckpointLoadError(
            f"Refused to load '{path}': {e}. Model-zoo .pkl files only hold numpy arrays; this one "
            f"would run code when unpickled. If you trust the file, set {UNSAFE_LOAD_ENV}=1."
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all
        raise CheckpointLoadError(
            f"Cannot read checkpoint '{path}' ({type(e).__name__}: {e}): the file is truncated or "
            "corrupt. Re-download or re-save it."
        ) from None


class DistillCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer (model-zoo ``.pkl``, Caffe2 name matching, URLs) that loads safely,
    explains unreadable files, and refuses a weights file that matches none of the model's keys
    (instead of warning while training starts from random weights)."""

    # The setting to fix, named in errors.
    weights_setting = "MODEL.WEIGHTS (train.init_checkpoint in LazyConfig)"

    def load(self, path, *args, **kwargs):
        self._path_being_loaded = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._path_being_loaded = None

    def _load_file(self, filename):
        if filename.endswith(".pkl") and not _unsafe_allowed():
            check_pickle_is_safe(filename)
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_torch_file(f)

    def _load_model(self, checkpoint):
        model_keys = set(self.model.state_dict().keys())
        file_keys = list(checkpoint["model"].keys())[:5]
        incompatible = super()._load_model(checkpoint)
        not_loaded = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        if model_keys and model_keys <= not_loaded:
            raise CheckpointLoadError(
                f"Checkpoint '{self._path_being_loaded}' matches none of the model's parameters "
                f"(first keys in the file: {file_keys}; the model expects e.g. "
                f"{sorted(model_keys)[:3]}). It is a checkpoint of another model: point "
                f"{self.weights_setting} at weights of this model."
            )
        return incompatible


class StrictCheckpointer(DistillCheckpointer):
    """A DistillCheckpointer that refuses a checkpoint leaving any parameter or buffer of the
    ``required`` parts unloaded (they would silently keep their random initialisation), or
    holding a tensor of the wrong shape anywhere."""

    def __init__(
        self,
        model: nn.Module,
        *,
        required: Sequence[str] = ("",),
        subject: str = "the model",
        fix: str = "Load the checkpoint trained with this config.",
        error: type = CheckpointLoadError,
    ):
        """
        Args:
            required: key prefixes of the parts that must be loaded ("" = every key).
            subject: what is being loaded, for messages ("the teacher model").
            fix: the sentence of the error saying what to do.
            error: the CheckpointLoadError subclass to raise.
        """
        super().__init__(model)
        self.required = tuple(required)
        self.subject, self.fix, self.error = subject, fix, error

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        self.check_coverage(incompatible)
        return incompatible

    def check_coverage(self, incompatible) -> None:
        """Raises ``self.error`` naming the first unloaded or mis-shaped keys.

        Args:
            incompatible: what loading the checkpoint reported (fvcore's ``_IncompatibleKeys``).
        """
        missing = [k for k in incompatible.missing_keys if k.startswith(self.required)]
        unused = sorted(set(incompatible.missing_keys) - set(missing))
        if unused:
            logger.info(f"Parts of {self.subject} that are not needed stay unloaded: {unused}")
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} parameters/buffers are not in the checkpoint, e.g. {missing[:5]}"
            )
        if incompatible.incorrect_shapes:
            shapes = [
                f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                for k, a, b in incompatible.incorrect_shapes[:5]
            ]
            problems.append(
                f"{len(incompatible.incorrect_shapes)} tensors have the wrong shape, e.g. {shapes}"
            )
        if problems:
            raise self.error(
                f"Checkpoint '{self._path_being_loaded}' does not fit {self.subject}: "
                + "; ".join(problems)
                + f". {self.fix}"
            )


def load_torch_file(path: str):
    """``torch.load`` on CPU with ``weights_only=True`` (unless PKD_ALLOW_UNSAFE_CHECKPOINTS=1);
    refused or unreadable files raise CheckpointLoadError saying why and what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not _unsafe_allowed())
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise _unreadable(path, e) from None
        raise CheckpointLoadError(
            f"Refused to load '{path}': it contains objects other than tensors and plain data, "
            f"and loading them would run code from the file. If you trust the file, set "
            f"{UNSAFE_LOAD_ENV}=1. ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path, error) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"Cannot read checkpoint '{path}' ({type(error).__name__}: {str(error).splitlines()[0]}): "
        "the file is truncated or corrupt. Re-download or re-save it."
    )
