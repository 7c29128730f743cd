"""Detections on image files drawn with detectron2's ``Visualizer`` (``tools/predict.py``)."""
import glob
import logging
import os
import time
from typing import List, Sequence

from detectron2.config import CfgNode
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..config import ConfigError
from ..utils.io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image files of ``inputs``: files as given, the images of a folder and the matches of a
    glob pattern, sorted; an input that yields none is an error."""
    paths = []
    for entry in inputs:
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, name) for name in os.listdir(entry)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(entry):
            found = [entry]
        else:
            found = sorted(glob.glob(os.path.expanduser(entry)))
        if not found:
            raise ConfigError(f"--input {entry}: no such file, no images in that folder, or no "
                              "match for that pattern.")
        paths += found
    names = [os.path.basename(p) for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"Inputs from different folders share the names {clashes}: their "
                          "pictures would overwrite each other; predict them separately.")
    return paths


def set_score_threshold(cfg: CfgNode, threshold: float) -> None:
    """Keep detections scoring at least ``threshold`` (RetinaNet, R-CNN and d2kd's FCOS)."""
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
    if "FCOS" in cfg.MODEL:
        cfg.MODEL.FCOS.SCORE_THRESH_TEST = threshold


def check_weights_exist(cfg: CfgNode) -> None:
    """A local ``MODEL.WEIGHTS`` must exist (the plain student config names an absolute path,
    which a moved folder breaks)."""
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS {weights} does not exist. If the folder was moved, "
                          f"pass --opts MODEL.WEIGHTS <its new path>/{os.path.basename(weights)}.")


def save_image(array, path: str) -> None:
    """An RGB ``uint8`` array as an image file at ``path`` (format from its extension),
    atomically."""
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension, "PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=image_format)


def predict_images(cfg: CfgNode, paths: Sequence[str], output_dir: str) -> List[str]:
    """Run ``DefaultPredictor(cfg)`` on every image file and write the detections drawn on it
    (class names from ``DATASETS.TEST[0]``'s metadata when it has them) to ``output_dir``
    under the image's name; returns the written paths."""
    predictor = DefaultPredictor(cfg)
    metadata = getattr(predictor, "metadata", Metadata())
    written = []
    for index, path in enumerate(paths, 1):
        start = time.perf_counter()
        image = read_image(path, format="BGR")
        instances = predictor(image)["instances"].to("cpu")
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        out = os.path.join(output_dir, os.path.basename(path))
        save_image(drawn.get_image(), out)
        written.append(out)
        logger.info("[%d/%d] %s: %d detections in %.2f s -> %s", index, len(paths), path,
                    len(instances), time.perf_counter() - start, out)
    return written
