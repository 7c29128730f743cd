"""The compiled detectron2 build's own paths: the fast COCOeval gives the official AP.

On a detectron2 with its compiled extension (``make test-upstream``), d2kd's trainer evaluates
with ``COCOEvaluator(use_fast_impl=True)`` (detectron2's C++ COCOeval); these tests check that
it really takes that path and that its AP equals pycocotools' (``use_fast_impl=False``) on the
same predictions: DigitsDet val ground truth with jittered boxes / masks, random scores, some
wrong classes, misses and false positives. On the pure-Python build they are skipped.
"""
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.structures import Boxes, Instances

from d2kd.compat import has_compiled_extension
from d2kd.engine.trainer import DistillTrainer

needs_compiled = pytest.mark.skipif(
    not has_compiled_extension(),
    reason="detectron2 is the pure-Python build (no compiled detectron2._C, so no fast "
           "COCOeval); `make test-upstream` runs this against a compiled detectron2",
)
VAL = "digitsdet_tiny_val"
# detectron2's own test of COCOeval_opt allows 1e-4 on precision / recall, i.e. 0.01 AP points;
# on these predictions (distinct scores, so no tie order) the two agree to rounding.
AP_TOLERANCE = 1e-6


def _predictions(dataset_dicts, num_classes: int, seed: int = 0):
    """(inputs, outputs) for COCOEvaluator.process: jittered ground truth plus noise."""
    rng = np.random.default_rng(seed)
    inputs, outputs = [], []
    for record in dataset_dicts:
        height, width = record["height"], record["width"]
        gt = annotations_to_instances(record["annotations"], (height, width),
                                      mask_format="bitmask")
        keep = rng.random(len(gt)) > 0.15  # some ground truth is missed
        boxes = gt.gt_boxes.tensor[torch.as_tensor(keep)]
        masks = gt.gt_masks.tensor[torch.as_tensor(keep)]
        classes = gt.gt_classes[torch.as_tensor(keep)].clone()
        n = len(boxes)
        sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        boxes = boxes + torch.as_tensor(rng.normal(0, 0.08, (n, 4)), dtype=torch.float32) * sizes
        wrong = torch.as_tensor(rng.random(n) < 0.1)
        classes[wrong] = torch.as_tensor(rng.integers(0, num_classes, int(wrong.sum())))
        masks = masks & torch.as_tensor(rng.random(masks.shape) > 0.2)  # ragged masks
        # False positives: random boxes with a filled mask.
        fp = 3
        xy = rng.uniform(0, [width - 20, height - 20], (fp, 2))
        wh = rng.uniform(8, 40, (fp, 2))
        fp_boxes = torch.as_tensor(np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1),
                                   dtype=torch.float32)
        fp_masks = torch.zeros((fp, height, width), dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(fp_boxes.round().int().tolist()):
            fp_masks[k, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(torch.cat([boxes, fp_boxes]))
        instances.pred_masks = torch.cat([masks, fp_masks])
        instances.pred_classes = torch.cat([classes, torch.as_tensor(
            rng.integers(0, num_classes, fp))])
        instances.scores = torch.as_tensor(rng.permutation(n + fp) / (n + fp) * 0.9 + 0.05,
                                           dtype=torch.float32)
        inputs.append({"image_id": record["image_id"], "height": height, "width": width})
        outputs.append({"instances": instances})
    return inputs, outputs


def _evaluate(inputs, outputs, use_fast_impl: bool, tmp_path):
    evaluator = COCOEvaluator(VAL, tasks=("bbox", "segm"), distributed=False,
                              output_dir=str(tmp_path / f"fast{int(use_fast_impl)}"),
                              use_fast_impl=use_fast_impl)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


class _CountingCOCOevalOpt(coco_evaluation.COCOeval_opt):
    calls = 0

    def evaluate(self):
        type(self).calls += 1
        return super().evaluate()


@needs_compiled
def test_fast_cocoeval_ap_matches_pycocotools(tiny_digitsdet, tmp_path, monkeypatch):
    dataset_dicts = DatasetCatalog.get(VAL)
    inputs, outputs = _predictions(dataset_dicts, num_classes=10)
    monkeypatch.setattr(coco_evaluation, "COCOeval_opt", _CountingCOCOevalOpt)
    official = _evaluate(inputs, outputs, use_fast_impl=False, tmp_path=tmp_path)
    assert _CountingCOCOevalOpt.calls == 0
    fast = _evaluate(inputs, outputs, use_fast_impl=True, tmp_path=tmp_path)
    assert _CountingCOCOevalOpt.calls == 2  # bbox and segm both went through the C++ COCOeval
    for task in ("bbox", "segm"):
        assert fast[task].keys() == official[task].keys()
        # Non-trivial predictions: neither perfect nor empty.
        assert 20 < official[task]["AP"] < 95, official[task]
        for key, value in official[task].items():
            other = fast[task][key]
            assert (math.isnan(value) and math.isnan(other)) or \
                abs(value - other) <= AP_TOLERANCE, (task, key, value, other)


def test_trainer_uses_the_fast_cocoeval_exactly_on_the_compiled_build(tiny_digitsdet, tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = DistillTrainer.build_evaluator(cfg, VAL)
    assert evaluator._use_fast_impl is has_compiled_extension()
