"""
DigitsDet: a small, deterministic COCO-format detection + instance segmentation dataset.

Each image is a random crop of one of the two real photos shipped with scikit-learn
(``load_sample_images``: china.jpg, flower.jpg) with a few unlabelled distractor shapes drawn
on it, onto which 2-6 real handwritten digits from ``load_digits`` (1,797 8x8 grey images,
10 classes) are alpha-composited in a colour that contrasts with the local background.
Digit sizes are calibrated so that the COCO small / medium / large ranges of the *mask* area
are all well represented (most images are close-ups with one large digit drawn first). Digits
may partially occlude each other (bounded); instance masks are the visible pixels of a digit.

Three splits: train (fits models), val (every choice: recipes, hyper-parameters, ablation
verdicts) and test (reports only). Train draws its digit samples from one pool, val and test
from another (a stratified 80/20 split of ``load_digits`` fixed independently of the dataset
seed), so no test or val digit sample is ever trained on. load_digits has no third set of
samples, so test shares val's pool: the same handwritten samples, drawn into new images
(another background crop, clutter, size, colour and position per digit; each image is seeded
from its own split). Generation is byte-for-byte reproducible: each image depends only on
(seed, split, index), so the test split, added after train and val existed, leaves them
unchanged. Usage::

    python -m d2kd.data.digitsdet --out datasets/digitsdet --seed 0 --num-train 2000 \
        --num-val 500 --num-test 500
"""

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
from pycocotools import mask as mask_util
from tqdm import tqdm

logger = logging.getLogger(__name__)

THING_CLASSES = [str(i) for i in range(10)]
SPLITS = ("train", "val", "test")
#: The digit-sample pool each split draws from (test shares val's: load_digits has no third set).
SPLIT_POOL = {"train": "train", "val": "val", "test": "val"}
# Seed of the train/val split of the digit pool: a constant, so pools are disjoint for any seed.
POOL_SPLIT_SEED = 1797
POOL_VAL_FRACTION = 0.2
# COCO thresholds on the (mask) area: small < 32^2 <= medium < 96^2 <= large.
AREA_SMALL_MAX = 32**2
AREA_MEDIUM_MAX = 96**2
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_JSON_KWARGS: Dict[str, Any] = {"sort_keys": True, "separators": (",", ":")}


@dataclass(frozen=True)
class DigitsDetSpec:
    seed: int = 0  # dataset seed; image i of split s is seeded with (seed, s, i)
    num_train: int = 2000  # number of training images
    num_val: int = 500  # number of validation images
    num_test: int = 500  # number of test images (digit samples from val's pool, see SPLIT_POOL)
    image_height: int = 192  # canvas height in pixels
    image_width: int = 256  # canvas width in pixels
    min_digits: int = 2  # minimum number of digits attempted per image
    max_digits: int = 6  # maximum number of digits attempted per image
    large_image_prob: float = 0.8  # probability that an image is a close-up with one large digit
    small_prob: float = 0.5  # probability that any other digit is small (else medium)
    small_side: Tuple[float, float] = (0.09, 0.27)  # small digit side, fraction of image height
    medium_side: Tuple[float, float] = (0.32, 0.8)  # medium digit side, fraction of image height
    large_side: Tuple[float, float] = (0.95, 1.05)  # large digit side (shrunk to fit the canvas)
    aspect_jitter: float = 0.15  # digit width = side * U(1 - aspect_jitter, 1 + aspect_jitter)
    stroke_sharpness: float = 2.0  # alpha = clip(s * (intensity / 16 - 0.5) + 0.5); keeps the mask
    min_contrast: float = 0.35  # minimum luminance gap between digit colour and background
    min_clutter: int = 0  # minimum number of distractor shapes per image
    max_clutter: int = 4  # maximum number of distractor shapes per image
    crop_scale: Tuple[float, float] = (0.25, 1.0)  # background crop area / largest crop area
    jitter: float = 0.2  # background brightness and contrast factors in U(1 - jitter, 1 + jitter)
    max_box_iou: float = 0.3  # maximum box IoU between a new digit and any placed digit
    max_occlusion: float = 0.3  # maximum fraction of a digit's mask hidden by later digits
    max_place_tries: int = 10  # position samples before a digit is dropped
    min_area: int = 20  # minimum visible mask area of an instance, in pixels
    min_box_side: int = 4  # minimum box width and height of an instance, in pixels

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"Invalid digit count range {self.min_digits}..{self.max_digits}")
        if not 0 <= self.min_clutter <= self.max_clutter:
            raise ValueError(f"Invalid clutter count range {self.min_clutter}..{self.max_clutter}")


@functools.lru_cache(maxsize=None)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """Returns the sklearn digits: (1797, 8, 8) float32 intensity / 16, (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _load_photos() -> Tuple[Image.Image, ...]:
    """Returns the two sklearn sample photos (china, flower) as 640x427 RGB PIL images."""
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(img) for img in load_sample_images().images)


@functools.lru_cache(maxsize=None)
def digit_pool_indices() -> Dict[str, np.ndarray]:
    """
    Returns {"train": (N_train,), "val": (N_val,)}: sorted, disjoint, read-only int64 indices
    into ``load_digits()``, a per-class ~80/20 split fixed by ``POOL_SPLIT_SEED``.
    """
    _, labels = _load_digits()
    rng = np.random.Generator(np.random.PCG64(POOL_SPLIT_SEED))
    train, val = [], []
    for c in range(len(THING_CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        num_val = int(round(POOL_VAL_FRACTION * len(idx)))
        val.append(idx[:num_val])
        train.append(idx[num_val:])
    pools = {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}
    for pool in pools.values():
        pool.setflags(write=False)
    return pools


def _background(rng: np.random.Generator, spec: DigitsDetSpec) -> Image.Image:
    """Returns an (H, W) RGB random crop of a photo, randomly flipped and colour-jittered."""
    photo = _load_photos()[rng.integers(2)]
    aspect = spec.image_width / spec.image_height
    crop_h = min(photo.height, photo.width / aspect) * np.sqrt(rng.uniform(*spec.crop_scale))
    y0 = rng.uniform(0, photo.height - crop_h)
    x0 = rng.uniform(0, photo.width - crop_h * aspect)
    box = (float(x0), float(y0), float(x0 + crop_h * aspect), float(y0 + crop_h))
    img = photo.resize((spec.image_width, spec.image_height), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    brightness, contrast = rng.uniform(1 - spec.jitter, 1 + spec.jitter, size=2)
    img = ImageEnhance.Brightness(img).enhance(float(brightness))
    return ImageEnhance.Contrast(img).enhance(float(contrast))


def _draw_clutter(img: Image.Image, rng: np.random.Generator, spec: DigitsDetSpec) -> None:
    """Draws unlabelled distractors (lines, ellipse/rectangle outlines, blobs) on ``img``."""
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(spec.min_clutter, spec.max_clutter + 1)):
        kind = rng.integers(4)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, 5))
        cx, cy = (float(v) for v in rng.uniform(0, 1, size=2) * img.size)
        rx, ry = (float(r) for r in rng.uniform(0.03, 0.25, size=2) * spec.image_height)
        if kind == 0:
            angle = rng.uniform(0, 2 * np.pi)
            dx, dy = float(2 * rx * np.cos(angle)), float(2 * rx * np.sin(angle))
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=width)
        elif kind == 1:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=colour, width=width)
        elif kind == 2:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], outline=colour, width=width)
        else:
            r, s = float(rng.uniform(2, 8)), float(rng.uniform(0.5, 1.5))
            draw.ellipse([cx - r, cy - r * s, cx + r, cy + r * s], fill=colour)


def _render_digit(
    digit: np.ndarray, height: float, width: float, sharpness: float, max_shape: Tuple[int, int]
) -> np.ndarray:
    """
    Upsamples an (8, 8) intensity map bicubically so that its 8x8 grid spans (height, width),
    with a zero border so strokes fade out instead of ending at the grid edge, and sharpens it
    with a contrast curve around 0.5 (the alpha > 0.5 mask is unchanged). Returns the tight
    (h, w) float32 alpha crop in [0, 1], scaled down if needed to fit ``max_shape``.
    """
    while True:
        size = (max(int(round(width * 10 / 8)), 1), max(int(round(height * 10 / 8)), 1))
        alpha = np.asarray(Image.fromarray(np.pad(digit, 1)).resize(size, Image.Resampling.BICUBIC))
        alpha = np.clip(sharpness * (alpha - 0.5) + 0.5, 0.0, 1.0)
        alpha[alpha < 1.0 / 32] = 0.0  # suppress bicubic ringing so that the crop is tight
        if not alpha.any():
            return alpha[:0, :0]
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        alpha = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        shrink = min(max_shape[0] / alpha.shape[0], max_shape[1] / alpha.shape[1])
        if shrink >= 1:
            return alpha
        height, width = height * shrink * 0.99, width * shrink * 0.99


def _mask_ok(mask: np.ndarray, spec: DigitsDetSpec) -> bool:
    """Whether an (h, w) bool mask is big enough (area, box sides) to be an instance."""
    if mask.sum() < spec.min_area:
        return False
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return min(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= spec.min_box_side


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of a (4,) XYXY box with (N, 4) XYXY boxes; returns (N,)."""
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + areas - inter)


def _sample_scales(rng: np.random.Generator, spec: DigitsDetSpec) -> np.ndarray:
    """
    Returns (n,) scale ids (0 small, 1 medium, 2 large) in drawing order. At most one digit is
    large; it is drawn first (at the bottom) so that smaller digits can still be placed on it.
    """
    scales = rng.random(rng.integers(spec.min_digits, spec.max_digits + 1)) >= spec.small_prob
    scales = scales.astype(np.int64)
    if rng.random() < spec.large_image_prob:
        scales[0] = 2
    return scales


def _find_position(
    mask: np.ndarray,
    owner: np.ndarray,
    boxes: List[np.ndarray],
    full_areas: np.ndarray,
    rng: np.random.Generator,
    spec: DigitsDetSpec,
) -> Optional[Tuple[int, int]]:
    """
    Samples a top-left (y, x) for an (h, w) bool digit mask on the (H, W) int32 ``owner`` map
    (-1 background, i visible pixel of instance i) such that the new digit's box IoU with the N
    placed ``boxes`` and the cumulative occlusion of each instance (vs. its (N,) ``full_areas``)
    stay within the limits and every instance stays valid. Returns None after too many tries.
    """
    h, w = mask.shape
    for _ in range(spec.max_place_tries):
        y = int(rng.integers(spec.image_height - h + 1))
        x = int(rng.integers(spec.image_width - w + 1))
        box = np.array([x, y, x + w, y + h])
        if boxes and _box_iou(box, np.stack(boxes)).max() > spec.max_box_iou:
            continue
        new_owner = owner.copy()
        new_owner[y : y + h, x : x + w][mask] = len(boxes)
        visible = np.bincount(new_owner.ravel() + 1, minlength=len(boxes) + 2)[1:-1]
        if np.any(visible < (1 - spec.max_occlusion) * full_areas):
            continue
        hit = np.unique(owner[y : y + h, x : x + w][mask])
        if all(_mask_ok(new_owner == i, spec) for i in hit[hit >= 0]):
            return y, x
    return None


def _contrasting_colour(rng: np.random.Generator, luma: float, min_contrast: float) -> np.ndarray:
    """Returns a (3,) float32 RGB colour in [0, 1] whose luminance is far enough from ``luma``."""
    candidates = rng.random((16, 3), dtype=np.float32)
    ok = np.flatnonzero(np.abs(candidates @ _LUMA - luma) >= min_contrast)
    if len(ok):
        return candidates[ok[0]]
    return np.full(3, 0.0 if luma > 0.5 else 1.0, dtype=np.float32)


def generate_image(
    spec: DigitsDetSpec, split_index: int, image_index: int
) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """
    Generates image ``image_index`` of split ``SPLITS[split_index]``. Returns the (H, W, 3) uint8
    image, the (H, W) int32 owner map (-1 background, i visible pixel of instance i) and the N
    category ids (1..10) of the instances.
    """
    seed = np.random.SeedSequence([spec.seed, split_index, image_index])
    rng = np.random.Generator(np.random.PCG64(seed))
    digits, labels = _load_digits()
    pool = digit_pool_indices()[SPLIT_POOL[SPLITS[split_index]]]
    img = _background(rng, spec)
    _draw_clutter(img, rng, spec)
    canvas = np.asarray(img, dtype=np.float32) / 255.0
    owner = np.full(canvas.shape[:2], -1, dtype=np.int32)
    boxes: List[np.ndarray] = []
    full_areas: List[int] = []
    category_ids: List[int] = []
    side_ranges = (spec.small_side, spec.medium_side, spec.large_side)
    for scale in _sample_scales(rng, spec):
        side = rng.uniform(*side_ranges[scale]) * spec.image_height
        width = side * rng.uniform(1 - spec.aspect_jitter, 1 + spec.aspect_jitter)
        sample = int(pool[rng.integers(len(pool))])
        alpha = _render_digit(digits[sample], side, width, spec.stroke_sharpness, canvas.shape[:2])
        mask = alpha > 0.5
        if not _mask_ok(mask, spec):
            continue
        pos = _find_position(mask, owner, boxes, np.array(full_areas), rng, spec)
        if pos is None:
            continue
        (y, x), (h, w) = pos, alpha.shape
        region = canvas[y : y + h, x : x + w]
        luma = float((region @ _LUMA * alpha).sum() / alpha.sum())
        region += alpha[:, :, None] * (_contrasting_colour(rng, luma, spec.min_contrast) - region)
        owner[y : y + h, x : x + w][mask] = len(boxes)
        boxes.append(np.array([x, y, x + w, y + h]))
        full_areas.append(int(mask.sum()))
        category_ids.append(int(labels[sample]) + 1)
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, owner, category_ids


def _annotations(
    owner: np.ndarray, category_ids: List[int], image_id: int, first_id: int
) -> List[Dict[str, Any]]:
    """COCO annotations (tight XYWH box, mask area, compressed RLE) from an (H, W) owner map."""
    anns = []
    for i, category_id in enumerate(category_ids):
        mask = owner == i
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
        rle["counts"] = rle["counts"].decode("ascii")
        bbox = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
        ann = {"id": first_id + i, "image_id": image_id, "category_id": category_id, "iscrowd": 0}
        ann.update(bbox=[float(v) for v in bbox], area=float(mask.sum()), segmentation=rle)
        anns.append(ann)
    return anns


def _generate_split(
    root: str, split_index: int, num_images: int, spec: DigitsDetSpec, show_progress: bool
) -> None:
    """Writes ``root/<split>/NNNNNN.png`` and ``root/<split>.json`` and logs a summary."""
    split = SPLITS[split_index]
    os.makedirs(os.path.join(root, split))
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for index in tqdm(range(num_images), desc=f"DigitsDet {split}", disable=not show_progress):
        image, owner, category_ids = generate_image(spec, split_index, index)
        file_name = f"{split}/{index:06d}.png"
        Image.fromarray(image).save(os.path.join(root, file_name), format="PNG", compress_level=1)
        height, width = image.shape[:2]
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        annotations += _annotations(owner, category_ids, index + 1, len(annotations) + 1)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(THING_CLASSES)]
    coco = {
        "info": {"description": f"DigitsDet {split}, seed {spec.seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump(coco, f, **_JSON_KWARGS)
    areas = np.array([a["area"] for a in annotations])
    num_small, num_large = (areas < AREA_SMALL_MAX).sum(), (areas >= AREA_MEDIUM_MAX).sum()
    logger.info(
        "DigitsDet %s: %d images, %d instances (small %d, medium %d, large %d)",
        split, len(images), len(areas), num_small, len(areas) - num_small - num_large, num_large,
    )


def _split_sizes(spec: DigitsDetSpec) -> Tuple[int, ...]:
    """Number of images of each split, in the order of :data:`SPLITS`."""
    return spec.num_train, spec.num_val, spec.num_test


def generate_digitsdet(out_dir: str, spec: DigitsDetSpec, show_progress: bool = True) -> None:
    """
    Writes DigitsDet to ``out_dir`` (spec.json, ``<split>.json`` and ``<split>/`` for each of
    :data:`SPLITS`) atomically: it is generated in a temporary sibling directory that is
    renamed into place once complete. Raises FileExistsError if ``out_dir`` exists.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"DigitsDet output {out_dir} already exists; delete it to regenerate")
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed process with the same pid
    os.makedirs(tmp_dir)
    try:
        with open(os.path.join(tmp_dir, "spec.json"), "w") as f:
            json.dump(dataclasses.asdict(spec), f, **_JSON_KWARGS)
        for split_index, num_images in enumerate(_split_sizes(spec)):
            _generate_split(tmp_dir, split_index, num_images, spec, show_progress)
        if os.path.exists(out_dir):
            raise FileExistsError(f"DigitsDet output {out_dir} was created during generation")
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def add_split(root: str, split: str, spec: DigitsDetSpec, show_progress: bool = True) -> None:
    """
    Adds ``split`` to an existing copy at ``root`` that lacks it (a copy made before the test
    split existed), generated from ``spec`` exactly as :func:`generate_digitsdet` would have:
    the existing splits stay byte-identical. The split is generated in a temporary sibling and
    moved in, its ``<split>.json`` last (a split folder without its JSON is a killed attempt
    and is redone); ``spec.json`` is then rewritten to record ``spec``. The caller holds the
    copy's lock.
    """
    root = os.path.abspath(root)
    split_index = SPLITS.index(split)
    tmp_dir = f"{root}.{split}-tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(os.path.join(root, split), ignore_errors=True)  # a killed attempt's images
    try:
        os.makedirs(tmp_dir)
        _generate_split(tmp_dir, split_index, _split_sizes(spec)[split_index], spec, show_progress)
        os.rename(os.path.join(tmp_dir, split), os.path.join(root, split))
        os.rename(os.path.join(tmp_dir, f"{split}.json"), os.path.join(root, f"{split}.json"))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    spec_file = os.path.join(root, "spec.json")
    with open(spec_file + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(spec), f, **_JSON_KWARGS)
    os.replace(spec_file + ".tmp", spec_file)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point, see the module docstring."""
    parser = argparse.ArgumentParser(description="Generate the DigitsDet COCO-format dataset.")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--seed", type=int, default=DigitsDetSpec.seed)
    parser.add_argument("--num-train", type=int, default=DigitsDetSpec.num_train)
    parser.add_argument("--num-val", type=int, default=DigitsDetSpec.num_val)
    parser.add_argument("--num-test", type=int, default=DigitsDetSpec.num_test)
    parser.add_argument("--image-height", type=int, default=DigitsDetSpec.image_height)
    parser.add_argument("--image-width", type=int, default=DigitsDetSpec.image_width)
    parser.add_argument("--quiet", action="store_true", help="disable the progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    spec = DigitsDetSpec(
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_height=args.image_height,
        image_width=args.image_width,
    )
    generate_digitsdet(args.out, spec, show_progress=not args.quiet)
