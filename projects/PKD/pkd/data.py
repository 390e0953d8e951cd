"""Built-in demo detection dataset: objects pasted onto real photographs, in COCO format.

The dataset is small enough to train and evaluate detectors on a CPU and needs no download: every
pixel comes from the sample photographs that ship inside scikit-image.

* Backgrounds are random crops of ``astronaut``, ``rocket``, ``camera``, ``hubble_deep_field``,
  ``immunohistochemistry``, ``brick``, ``grass``, ``gravel`` and ``moon``, rescaled to a random size
  between 112 and 176 pixels per side (odd sizes included) and randomly flipped.
* Three object classes are cut out of other photographs with a mask and pasted onto them:
  ``coin`` (any of the 23 coins cleanly segmented from ``coins``), ``cat`` (an elliptical cut of
  the cat's face from ``chelsea``) and ``cup`` (the espresso cup and saucer from ``coffee``). Each
  paste is randomly scaled (longest side 16-64 px), stretched, flipped and brightened or darkened.
* Every image has 1-4 objects (fewer when no free spot is found), except every 20th (index 0, 20,
  ...), which has none. Two boxes share at most 20% of the smaller one's area, and each box is
  tight around the object's visible (not occluded) pixels.

Each image is drawn from its own generator seeded by ``(seed, split, index)``, so a build is
byte-for-byte reproducible (images are PNG) and growing a split does not change earlier images.
"""
import json
import os
import shutil
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from scipy import ndimage as ndi
from skimage import data as skdata
from skimage import filters, measure, morphology, segmentation

DEMO_TRAIN = "pkd_demo_train"
DEMO_VAL = "pkd_demo_val"
# A larger held-out split for measuring accuracy (benchmarks/accuracy.py), used for nothing else:
# settings are chosen on DEMO_VAL, never on the split a result is reported on.
DEMO_TEST = "pkd_demo_test"
DEMO_CLASSES = ("coin", "cat", "cup")

_VERSION = 1
_BACKGROUNDS = ("astronaut", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
                "brick", "grass", "gravel", "moon")
_IMAGE_SIDE = (112, 176)  # inclusive range of image heights and widths
_OBJECT_SIDE = (16, 64)  # inclusive range of an object's longest side
_MAX_OBJECTS = 4
_EMPTY_EVERY = 20  # image indices divisible by this have no objects
_MAX_OVERLAP = 0.2  # largest fraction of either box that two boxes may share
_PLACEMENT_TRIES = 20

Template = Tuple[np.ndarray, np.ndarray]  # (RGB patch, boolean mask), same height and width


def _rgb(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as an HxWx3 uint8 array (grayscale is replicated into three channels)."""
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _ellipses_template(image: np.ndarray, ellipses) -> Template:
    """Cut the union of ellipses ``(cx, cy, rx, ry)`` out of ``image``, cropped to that union."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    mask = np.zeros(image.shape[:2], bool)
    for cx, cy, rx, ry in ellipses:
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    rows, cols = np.nonzero(mask)
    box = np.s_[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    return _rgb(image)[box], mask[box]


def _coin_templates() -> List[Template]:
    """Segment the coins of ``skimage.data.coins`` (watershed on the Sobel map, as in its docs).

    Regions that are small or not convex (a coin that is partly cut off) are dropped.
    """
    coins = skdata.coins()
    markers = np.zeros_like(coins)
    markers[coins < 30], markers[coins > 150] = 1, 2
    foreground = segmentation.watershed(filters.sobel(coins), markers) == 2
    foreground = ndi.binary_fill_holes(morphology.binary_opening(foreground, morphology.disk(2)))
    regions = measure.regionprops(measure.label(foreground))
    return [(_rgb(coins)[r.slice], r.image) for r in regions if r.area > 300 and r.solidity > 0.95]


@lru_cache(maxsize=1)
def _templates() -> Tuple[List[Template], ...]:
    """Object templates for each class of ``DEMO_CLASSES``, in that order."""
    cat = _ellipses_template(skdata.chelsea(), [(225, 165, 185, 140)])
    cup = _ellipses_template(skdata.coffee(), [(279, 230, 201, 155), (290, 112, 118, 94)])
    return _coin_templates(), [cat], [cup]


@lru_cache(maxsize=1)
def _backgrounds() -> Tuple[np.ndarray, ...]:
    """The background photographs, as RGB arrays."""
    return tuple(_rgb(getattr(skdata, name)()) for name in _BACKGROUNDS)


def _random_background(rng: np.random.Generator) -> np.ndarray:
    """A random crop of a random background photograph, rescaled to a random size and flipped."""
    source = _backgrounds()[rng.integers(len(_BACKGROUNDS))]
    height, width = rng.integers(_IMAGE_SIDE[0], _IMAGE_SIDE[1] + 1, size=2)
    zoom = rng.uniform(1.0, min(source.shape[0] / height, source.shape[1] / width))
    crop_h, crop_w = int(height * zoom), int(width * zoom)
    y0 = rng.integers(source.shape[0] - crop_h + 1)
    x0 = rng.integers(source.shape[1] - crop_w + 1)
    image = cv2.resize(source[y0: y0 + crop_h, x0: x0 + crop_w], (int(width), int(height)),
                       interpolation=cv2.INTER_AREA)
    return image[:, ::-1] if rng.random() < 0.5 else image


def _random_object(rng: np.random.Generator, template: Template) -> Template:
    """``template`` randomly rescaled, stretched, flipped and brightened or darkened."""
    patch, mask = template
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33))) * patch.shape[1] / patch.shape[0]
    side = rng.integers(_OBJECT_SIDE[0], _OBJECT_SIDE[1] + 1)
    size = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
    size = tuple(int(max(s, _OBJECT_SIDE[0] // 2)) for s in size)  # (width, height)
    patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
    patch = np.clip(patch * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
    mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0.5
    return (patch[:, ::-1], mask[:, ::-1]) if rng.random() < 0.5 else (patch, mask)


def _overlaps_too_much(box: Tuple[int, int, int, int], boxes) -> bool:
    """Whether ``box`` (x0, y0, x1, y1) shares more than ``_MAX_OVERLAP`` of itself or a box."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in boxes:
        inter_w = min(box[2], other[2]) - max(box[0], other[0])
        inter_h = min(box[3], other[3]) - max(box[1], other[1])
        other_area = (other[2] - other[0]) * (other[3] - other[1])
        if inter_w > 0 and inter_h > 0 and inter_w * inter_h > _MAX_OVERLAP * min(area, other_area):
            return True
    return False


def _render_image(rng: np.random.Generator, num_objects: int):
    """Paste up to ``num_objects`` objects on a background; return the image and its COCO boxes.

    Boxes are ``(category_id, [x, y, w, h], visible_area)``, tight around the visible pixels.
    """
    image = _random_background(rng).copy()
    owner = np.full(image.shape[:2], -1)  # index of the object that shows at each pixel
    classes, boxes = [], []
    for _ in range(num_objects):
        cls = int(rng.integers(len(DEMO_CLASSES)))
        templates = _templates()[cls]
        patch, mask = _random_object(rng, templates[rng.integers(len(templates))])
        for _ in range(_PLACEMENT_TRIES):
            y0 = int(rng.integers(image.shape[0] - mask.shape[0] + 1))
            x0 = int(rng.integers(image.shape[1] - mask.shape[1] + 1))
            box = (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])
            if not _overlaps_too_much(box, boxes):
                region = np.s_[y0: box[3], x0: box[2]]
                image[region][mask] = patch[mask]
                owner[region][mask] = len(boxes)
                classes.append(cls)
                boxes.append(box)
                break
    annotations = []
    for index, cls in enumerate(classes):
        rows, cols = np.nonzero(owner == index)
        bbox = [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1]
        annotations.append((cls + 1, bbox, float(rows.size)))
    return image, annotations


def _build_split(image_dir: str, json_path: str, num_images: int, seed: int, split: int) -> None:
    """Render ``num_images`` images into ``image_dir`` and their COCO json into ``json_path``."""
    shutil.rmtree(image_dir, ignore_errors=True)
    os.makedirs(image_dir)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split, index])
        num_objects = 0 if index % _EMPTY_EVERY == 0 else int(rng.integers(1, _MAX_OBJECTS + 1))
        image, boxes = _render_image(rng, num_objects)
        file_name = f"{index:06d}.png"
        cv2.imwrite(os.path.join(image_dir, file_name), image[:, :, ::-1])
        images.append({"id": index + 1, "file_name": file_name,
                       "height": image.shape[0], "width": image.shape[1]})
        for category_id, bbox, area in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "bbox": bbox,
                                "area": area, "iscrowd": 0, "category_id": category_id})
    categories = [{"id": i + 1, "name": name, "supercategory": "object"}
                  for i, name in enumerate(DEMO_CLASSES)]
    with open(json_path, "w") as f:
        json.dump({"info": {"description": "PKD demo dataset", "version": _VERSION},
                   "images": images, "annotations": annotations, "categories": categories}, f)


_SPLITS = ((DEMO_TRAIN, "train"), (DEMO_VAL, "val"), (DEMO_TEST, "test"))


def _split_paths(root: str) -> Dict[str, Tuple[str, str]]:
    """``{split_name: (json_path, image_dir)}`` of the demo dataset under ``root``."""
    return {name: (os.path.join(root, "annotations", f"instances_{split}.json"),
                   os.path.join(root, split))
            for name, split in _SPLITS}


def build_demo_dataset(root: str, num_train: int = 240, num_val: int = 60, num_test: int = 300,
                       seed: int = 0) -> Dict[str, Tuple[str, str]]:
    """Write the demo dataset under ``root`` unless an identical build is already there.

    Writes ``root/{train,val,test}/NNNNNN.png``, ``root/annotations/instances_{split}.json``
    and, last, ``root/manifest.json`` (version, seed and sizes); a build with the same manifest is
    reused as it is.

    Returns:
        ``{DEMO_TRAIN: (json_path, image_dir), DEMO_VAL: ..., DEMO_TEST: ...}``.
    """
    paths = _split_paths(root)
    manifest_path = os.path.join(root, "manifest.json")
    manifest = {"version": _VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
                "num_test": num_test}
    if os.path.isfile(manifest_path) and all(os.path.isfile(j) for j, _ in paths.values()):
        with open(manifest_path) as f:
            if json.load(f) == manifest:
                return paths
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    counts = {DEMO_TRAIN: num_train, DEMO_VAL: num_val, DEMO_TEST: num_test}
    for split, (name, _) in enumerate(_SPLITS):
        _build_split(paths[name][1], paths[name][0], counts[name], seed, split)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return paths


def register_demo_datasets(root: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
    """Build the default-sized demo dataset if needed and register its splits (``DEMO_TRAIN``,
    ``DEMO_VAL``, ``DEMO_TEST``).

    ``root`` defaults to ``$DETECTRON2_DATASETS/pkd_demo`` (``datasets/pkd_demo``). Names that are
    already registered for the same json file are left alone, so calling this twice is harmless;
    a name registered for another file raises ``ValueError``.

    Returns:
        ``{split_name: (json_path, image_dir)}``, as :func:`build_demo_dataset`.
    """
    if root is None:
        root = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "pkd_demo")
    paths = _split_paths(os.path.abspath(root))
    for name, (json_path, _) in paths.items():
        registered = MetadataCatalog.get(name).get("json_file") if name in DatasetCatalog else None
        if registered not in (None, json_path):
            raise ValueError(f"{name} is already registered for {registered}, not {json_path}")
    build_demo_dataset(os.path.abspath(root))
    for name, (json_path, image_dir) in paths.items():
        if name not in DatasetCatalog:
            metadata = {"thing_classes": list(DEMO_CLASSES)}
            register_coco_instances(name, metadata, json_path, image_dir)
    return paths
