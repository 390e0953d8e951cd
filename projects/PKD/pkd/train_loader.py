"""The training data loader of both config kinds, able to continue the data order of an
interrupted run: Detectron2's own loader, its sampler wrapped in a :class:`ResumableSampler`."""
import itertools
from typing import Iterator, Optional

from torch.utils.data import IterableDataset, Sampler

from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from detectron2.utils.registry import locate

__all__ = [
    "ResumableSampler",
    "ResumableLoader",
    "build_resumable_train_loader",
    "build_resumable_lazy_train_loader",
]


class ResumableSampler(Sampler):
    """Wraps an (infinite) training sampler; after :meth:`start_at` it skips the indices that
    the iterations before the resume point consumed, so a resumed run sees the same data order
    as an uninterrupted one. Skipping costs index generation only, no data loading."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self._skip = 0

    def start_at(self, iteration: int, images_per_rank: int) -> None:
        self._skip = iteration * images_per_rank

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self._skip, None)

    def __len__(self):
        return len(self.sampler)


class ResumableLoader:
    """A training data loader (iterating it iterates ``loader``) that :meth:`start_at` positions
    at a given iteration, before the first batch is drawn."""

    def __init__(self, loader, sampler: Optional[ResumableSampler], total_batch_size: int):
        """
        Args:
            loader: the data loader, drawing its indices from ``sampler``.
            sampler: None for an IterableDataset (nothing to skip).
            total_batch_size: images per iteration over all processes.
        """
        self.loader = loader
        self.sampler = sampler
        self.total_batch_size = total_batch_size

    def start_at(self, iteration: int) -> None:
        """Skips the images that ``iteration`` iterations consumed in this process."""
        if self.sampler is not None:
            images_per_rank = self.total_batch_size // comm.get_world_size()
            self.sampler.start_at(iteration, images_per_rank)

    def __iter__(self):
        return iter(self.loader)


def _resumable(sampler: Optional[Sampler]) -> Optional[ResumableSampler]:
    return ResumableSampler(sampler) if sampler is not None else None


def build_resumable_train_loader(cfg) -> ResumableLoader:
    """Detectron2's train loader for a yacs cfg (the sampler ``DATALOADER.SAMPLER_TRAIN`` names),
    resumable."""
    # build_detection_train_loader is @configurable: from_config gives the arguments a cfg means.
    kwargs = build_detection_train_loader.from_config(cfg)
    sampler = kwargs["sampler"] = _resumable(kwargs["sampler"])
    return ResumableLoader(
        build_detection_train_loader(**kwargs), sampler, kwargs["total_batch_size"]
    )


def build_resumable_lazy_train_loader(train_cfg) -> ResumableLoader:
    """Same for a LazyConfig ``dataloader.train`` node calling ``build_detection_train_loader``
    (or any loader function with ``dataset``, ``sampler`` and ``total_batch_size`` arguments)."""
    target = train_cfg._target_
    if isinstance(target, str):
        target = locate(target)
    kwargs = {k: instantiate(v) for k, v in train_cfg.items() if k != "_target_"}
    sampler = kwargs.get("sampler")
    if sampler is None and not isinstance(kwargs["dataset"], IterableDataset):
        sampler = TrainingSampler(len(kwargs["dataset"]))
    kwargs["sampler"] = sampler = _resumable(sampler)
    return ResumableLoader(target(**kwargs), sampler, kwargs["total_batch_size"])
