"""Tests of the built-in demo dataset (pkd.data)."""
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from pkd.data import (DEMO_CLASSES, DEMO_TEST, DEMO_TRAIN, DEMO_VAL, _random_background,
                      _render_image, build_demo_dataset, register_demo_datasets)

SMALL = dict(num_train=12, num_val=6, num_test=5)


def _files(root):
    """{relative path: bytes} of every file under ``root``."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return root, build_demo_dataset(root, **SMALL)


def test_layout(small_build):
    root, paths = small_build
    assert set(paths) == {DEMO_TRAIN, DEMO_VAL, DEMO_TEST}
    assert paths[DEMO_TRAIN] == (os.path.join(root, "annotations", "instances_train.json"),
                                 os.path.join(root, "train"))
    assert len(os.listdir(paths[DEMO_TRAIN][1])) == SMALL["num_train"]
    assert len(os.listdir(paths[DEMO_VAL][1])) == SMALL["num_val"]
    assert len(os.listdir(paths[DEMO_TEST][1])) == SMALL["num_test"]
    assert len(DEMO_CLASSES) == 3


def test_deterministic(small_build, tmp_path):
    root, _ = small_build
    build_demo_dataset(str(tmp_path), **SMALL)
    first, second = _files(root), _files(str(tmp_path))
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)


def test_seed_changes_images(small_build, tmp_path):
    root, _ = small_build
    build_demo_dataset(str(tmp_path), seed=1, **SMALL)
    first, second = _files(root), _files(str(tmp_path))
    assert first["annotations/instances_train.json"] != second["annotations/instances_train.json"]


@pytest.mark.parametrize("split", [DEMO_TRAIN, DEMO_VAL, DEMO_TEST])
def test_coco_valid(small_build, split):
    json_path, image_dir = small_build[1][split]
    coco = COCO(json_path)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(DEMO_CLASSES)
    assert coco.getCatIds() == [1, 2, 3]
    sizes = set()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(os.path.join(image_dir, info["file_name"]))
        assert image.shape == (info["height"], info["width"], 3)
        assert 112 <= info["height"] <= 176 and 112 <= info["width"] <= 176
        sizes.add(image.shape[:2])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) <= 4
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
            assert ann["category_id"] in (1, 2, 3)
    assert len(sizes) > 1
    # Every 20th image, starting with the first, has no objects.
    assert coco.getAnnIds(imgIds=1) == []
    assert len(coco.getAnnIds()) >= len(coco.getImgIds())


def test_boxes_are_tight_around_pasted_pixels():
    """Each box is the smallest box holding its visible pixels, and nothing is pasted elsewhere."""
    for index in range(1, 13):
        image, boxes = _render_image(np.random.default_rng([0, 0, index]), 4)
        background = _random_background(np.random.default_rng([0, 0, index]))
        pasted = (image != background).any(axis=2)
        covered = np.zeros_like(pasted)
        for _, (x, y, w, h), area in boxes:
            assert max(w, h) <= 64 and 0 < area <= w * h
            inside = pasted[y: y + h, x: x + w]
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            covered[y: y + h, x: x + w] = True
        assert not (pasted & ~covered).any()


def test_rebuild_skipped_when_manifest_matches(tmp_path):
    root = str(tmp_path)
    paths = build_demo_dataset(root, **SMALL)
    watched = [paths[DEMO_TRAIN][0], os.path.join(paths[DEMO_VAL][1], "000000.png")]
    for path in watched:
        os.utime(path, (1, 1))
    build_demo_dataset(root, **SMALL)
    assert [os.stat(p).st_mtime for p in watched] == [1, 1]
    build_demo_dataset(root, **dict(SMALL, num_train=SMALL["num_train"] + 1))
    assert all(os.stat(p).st_mtime != 1 for p in watched)
    assert len(os.listdir(paths[DEMO_TRAIN][1])) == SMALL["num_train"] + 1


@pytest.fixture
def clean_catalog():
    """Unregister the demo datasets before and after the test."""
    def unregister():
        for name in (DEMO_TRAIN, DEMO_VAL, DEMO_TEST):
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    unregister()
    yield
    unregister()


def test_register(tmp_path, monkeypatch, clean_catalog):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    # Registering builds the default-sized dataset (about a second).
    paths = register_demo_datasets()
    assert paths[DEMO_VAL][0] == str(tmp_path / "pkd_demo" / "annotations" / "instances_val.json")
    assert register_demo_datasets(str(tmp_path / "pkd_demo")) == paths  # idempotent
    for name in (DEMO_TRAIN, DEMO_VAL, DEMO_TEST):
        dicts = DatasetCatalog.get(name)
        assert dicts and all("annotations" in d for d in dicts)
        assert any(d["annotations"] for d in dicts)
        assert MetadataCatalog.get(name).thing_classes == list(DEMO_CLASSES)
    with pytest.raises(ValueError, match="already registered"):
        register_demo_datasets(str(tmp_path / "elsewhere"))
