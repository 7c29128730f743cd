"""Every composition the config accepts trains on 2 processes (gloo) (docs/trust.md): teacher
schedules whose stages add, drop or change prototype heads, DetKDS genomes of each input kind
(a response-only genome builds no adapter, which DDP would find unused), and every training
sampler detectron2 offers."""
import json

import pytest
from conftest import launch_two_processes, save_untrained_teacher

pytestmark = [pytest.mark.slow, pytest.mark.long]

MTPD = "retinanet_R18_from_R50_R34_mtpd_mgd.yaml"
GK_OPTS = ("DISTILL.PROTOTYPES.MIN_BOX_SIZE", "4.0", "DISTILL.PROTOTYPES.NUM_PROTOTYPES", "2")


def _metric_keys(output_dir) -> set:
    keys = set()
    for line in (output_dir / "metrics.json").read_text().splitlines():
        keys.update(json.loads(line))
    return keys


@pytest.mark.parametrize("stage_heads", [
    ("MGDHead", "GlobalKnowledgeHead"),  # a prototype head added in stage 2
    ("GlobalKnowledgeHead", "MGDHead"),  # ... dropped
    ("GlobalKnowledgeHead", "FitNetHead"),  # ... replaced by a head without bank
], ids=["add", "drop", "change"])
def test_schedule_stages_with_other_heads(tiny_digitsdet, teachers, tmp_path, stage_heads):
    stage_opts = str([["DISTILL.HEADS", f"['{h}']"] for h in stage_heads])
    launch_two_processes(MTPD, tmp_path, tiny_digitsdet, "DISTILL.TEACHER.WEIGHTS",
                         str(list(teachers)), "SOLVER.MAX_ITER", "4",
                         "DISTILL.SCHEDULE.STAGE_ITERS", "[2, 2]", "DISTILL.HEADS", "[]",
                         "DISTILL.SCHEDULE.STAGE_OPTS", stage_opts, *GK_OPTS)
    log = (tmp_path / "log.txt").read_text()
    builds = log.count("Prototype refresh 1:")  # the bank of each stage with a GK head
    assert builds == stage_heads.count("GlobalKnowledgeHead")
    keys = _metric_keys(tmp_path)
    assert "loss_kd_global_knowledge_global" in keys
    assert (tmp_path / "model_final_student.pth").is_file()


@pytest.mark.parametrize("genome", [
    "global:catt|scale_r2|norm_N|l1|w=6", "fgbg:no|local_s4|norm_HW|l1|w=2",
    "instance:catt|scale_r1|norm_C|l1|w=50", "logit:no|no|softmax_C|kl|w=1",
    "loc:no|no|no|smooth_l1|w=1"], ids=["global", "fgbg", "instance", "logit", "loc"])
def test_detkds_genome_of_each_input(tiny_digitsdet, tmp_path, genome):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "teacher")
    launch_two_processes("retinanet_R18_from_R50_detkds.yaml", tmp_path, tiny_digitsdet,
                         "DISTILL.TEACHER.WEIGHTS", f"['{weights}']",
                         "DISTILL.DETKDS.GENOME", genome)
    assert f"loss_kd_detkds_{genome.split(':')[0]}" in _metric_keys(tmp_path)


@pytest.mark.parametrize("sampler", ["RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler"])
def test_training_samplers(tiny_digitsdet, tmp_path, sampler):
    launch_two_processes("retinanet_R18_student.yaml", tmp_path, tiny_digitsdet,
                         "DATALOADER.SAMPLER_TRAIN", sampler, "DATALOADER.REPEAT_THRESHOLD", "0.5",
                         "DATALOADER.RANDOM_SUBSET_RATIO", "0.5")
    assert f"Training sampler {sampler}" in (tmp_path / "log.txt").read_text()
