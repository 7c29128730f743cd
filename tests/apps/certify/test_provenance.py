"""A result file names what its run started from, taken when the run started (and resumed)."""
import json
import os
import shutil

import pytest
from conftest import distill_cfg

from d2kd.apps.certify import provenance


def test_the_provenance_is_taken_at_the_start_and_later_differing_starts_are_listed(
        tiny_digitsdet, teacher_weights, tmp_path, monkeypatch):
    teacher = str(tmp_path / "teacher.pth")  # a copy: this test changes it
    shutil.copyfile(teacher_weights, teacher)
    cfg = distill_cfg(str(tmp_path / "run"), teacher)
    out = str(tmp_path / "run")
    os.makedirs(out)
    commits = iter(["a" * 40, "a" * 40, "b" * 40])
    monkeypatch.setattr(provenance, "code_version",
                        lambda: {"d2kd": "0", "commit": next(commits), "dirty": False})
    provenance.record_start(cfg, out, threads=1)  # the start
    provenance.record_start(cfg, out, threads=1)  # a resume with the same checkout
    record = provenance.run_provenance(out)
    assert record["code"]["commit"] == "a" * 40 and "later_starts_differ" not in record
    assert record["inputs"]["teachers"][0]["sha256"] == provenance.weights_hash(teacher)

    with open(teacher, "ab") as f:  # the teacher file changes, then a resume
        f.write(b"\0")
    provenance.record_start(cfg, out, threads=1)
    record = provenance.run_provenance(out)
    assert record["code"]["commit"] == "a" * 40  # what the run started from
    (later,) = record["later_starts_differ"]
    assert later["code"]["commit"] == "b" * 40
    assert later["inputs"]["teachers"][0]["sha256"] != record["inputs"]["teachers"][0]["sha256"]
    with open(os.path.join(out, provenance.STARTS)) as f:
        assert len(json.load(f)) == 3


def test_a_run_without_a_recorded_start_has_no_provenance(tmp_path):
    with pytest.raises(FileNotFoundError, match="record_start was not called"):
        provenance.run_provenance(str(tmp_path))
