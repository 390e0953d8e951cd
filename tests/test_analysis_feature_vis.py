"""The feature pictures: one renderer for TensorBoard and the report."""
import numpy as np
import torch

from detectron2.utils.events import EventStorage

from pkd.analysis.feature_vis import (
    FeatureColumn,
    channel_mean_abs,
    put_feature_images,
    render_feature_pair,
    render_pcc_histograms,
)

from pkd_testing import make_batch


def distinct_colours(rgb):
    return len(np.unique(rgb.reshape(-1, 3), axis=0))


def test_channel_mean_abs():
    maps = torch.tensor([[[[1.0, -3.0]], [[-1.0, 1.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(channel_mean_abs(maps), torch.tensor([[[1.0, 2.0]]]))


def test_feature_pair_picture_grows_with_images_and_columns():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    one = render_feature_pair("t", [FeatureColumn("teacher p2", t, 4)], [(60, 64)])
    columns = [FeatureColumn("teacher p2", t, 4), FeatureColumn("student p3", s, 8)]
    inputs = [np.zeros((60, 64, 3), np.uint8)] * 2
    two = render_feature_pair("t", columns, [(60, 64), (64, 40)], inputs)
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    assert two.shape[0] > one.shape[0] and two.shape[1] > one.shape[1]
    assert distinct_colours(two) > 10


def test_pcc_histograms_skip_missing_series():
    r = torch.linspace(-0.5, 0.9, 16)
    picture = render_pcc_histograms(["p3", "p4"], {"distilled": [r, r], "no KD": [None, r * 0.5]})
    assert picture.shape[1] > picture.shape[0] and distinct_colours(picture) > 10


def test_put_feature_images_names_each_pair():
    batch = make_batch(sizes=((64, 80), (72, 64), (64, 64)), boxes_per_image=(1, 1, 1))
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 4, 10, 12, generator=g), torch.randn(3, 4, 5, 6, generator=g)]
    t = [torch.randn(3, 4, 20, 24, generator=g), torch.randn(3, 4, 10, 12, generator=g)]
    with EventStorage(7) as storage:
        pairs, strides = [("p3", "p2"), ("p4", "p3")], [(8, 4), (16, 8)]
        put_feature_images(storage, batch, pairs, s, t, strides, "BGR")
        # Detectron2's TensorBoard writer reads these (name, CHW image in [0, 1], iteration)
        images = {name: (image, it) for name, image, it in storage._vis_data}
    assert sorted(images) == ["kd/features_p3", "kd/features_p4"]
    image, iteration = images["kd/features_p3"]
    assert iteration == 7 and image.shape[0] == 3 and 0.0 <= image.min() < image.max() <= 1.0
