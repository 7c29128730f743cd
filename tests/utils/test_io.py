"""Weights files d2kd writes (d2kd/utils/io.py, d2kd/engine/checkpoint.py): their bytes, and so
the SHA-256 a result file records, depend on the weights alone, not on the file's name."""
import io

import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2kd.engine.checkpoint import AtomicCheckpointer
from d2kd.utils.hashing import file_sha256
from d2kd.utils.io import atomic_save


def _weights():
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 3).state_dict(), "__author__": "test"}


def test_the_same_weights_saved_under_two_names_are_the_same_bytes(tmp_path):
    weights = _weights()
    atomic_save(weights, str(tmp_path / "a" / "R50_FPN128.pth"))
    atomic_save(weights, str(tmp_path / "b" / "model_final.pth"))
    buffer = io.BytesIO()  # the reference: torch's serialization of the object alone
    torch.save(weights, buffer)
    assert (tmp_path / "a" / "R50_FPN128.pth").read_bytes() == buffer.getvalue()
    assert (tmp_path / "b" / "model_final.pth").read_bytes() == buffer.getvalue()
    loaded = torch.load(tmp_path / "a" / "R50_FPN128.pth", weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in weights["model"].items())


def test_checkpoints_of_the_same_model_hash_alike_in_two_folders(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    for folder in ("run_a", "run_b"):
        AtomicCheckpointer(model, save_dir=str(tmp_path / folder)).save("model_final",
                                                                        iteration=9)
    assert file_sha256(str(tmp_path / "run_a" / "model_final.pth")) == \
        file_sha256(str(tmp_path / "run_b" / "model_final.pth"))
    restored = torch.nn.Linear(4, 3)
    DetectionCheckpointer(restored).load(str(tmp_path / "run_b" / "model_final.pth"))
    assert torch.equal(restored.weight, model.weight)
