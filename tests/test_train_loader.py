"""The resumable training loader: a resumed run draws the indices an uninterrupted one would."""
import itertools

from detectron2.data.samplers import TrainingSampler

from pkd.train_loader import ResumableLoader, ResumableSampler


def _first(iterable, n, skip=0):
    return list(itertools.islice(iter(iterable), skip, skip + n))


def test_sampler_continues_the_uninterrupted_order():
    sampler = ResumableSampler(TrainingSampler(10, seed=3))
    assert _first(sampler, 12) == _first(TrainingSampler(10, seed=3), 12)
    sampler.start_at(iteration=4, images_per_rank=3)
    assert _first(sampler, 12) == _first(TrainingSampler(10, seed=3), 12, skip=12)


def test_loader_skips_what_the_iterations_before_consumed():
    sampler = ResumableSampler(TrainingSampler(7, seed=0))
    loader = ResumableLoader(loader=sampler, sampler=sampler, total_batch_size=4)
    loader.start_at(5)  # one process: 5 iterations x 4 images
    assert _first(loader, 6) == _first(TrainingSampler(7, seed=0), 6, skip=20)
    iterable = ResumableLoader(loader=[1, 2], sampler=None, total_batch_size=4)
    iterable.start_at(5)  # an IterableDataset's loader: no sampler, nothing to skip
    assert list(iterable) == [1, 2]
