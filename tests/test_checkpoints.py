"""Checkpoints: atomic writes with the previous one kept, and refusal of damaged or unsafe files."""
import os

import pytest
import torch

from training import checkpoints, errors


def state(v):
    return {"kind": "standard_vae", "model": {"w": torch.full((3,), float(v))},
            "args": {"latent": 3}, "step": v}


def test_save_is_atomic_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(1))
    checkpoints.save(path, state(2))
    assert checkpoints.load(path)["step"] == 2
    assert checkpoints.load(tmp_path / "checkpoint.prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_truncated_checkpoint_names_the_previous_good_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, state(1))
    checkpoints.save(path, state(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointError, match="damaged") as e:
        checkpoints.load(path)
    assert "checkpoint.prev.pt" in str(e.value)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(errors.CheckpointError, match="damaged"):
        checkpoints.load(path)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_payload_is_refused_not_executed(tmp_path):
    target = tmp_path / "pwned"
    payload = Payload()
    payload.target = target
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "args": {}, "evil": payload}, path)
    with pytest.raises(errors.CheckpointError, match="damaged or not a checkpoint"):
        checkpoints.load(path)
    assert not target.exists()


def test_foreign_file_and_wrong_kind_are_clear_errors(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(errors.CheckpointError, match="not a checkpoint written by these scripts"):
        checkpoints.load(path)
    with pytest.raises(errors.CheckpointError, match="holds a standard_vae model, not a vq_vae"):
        checkpoints.check_kind(state(1), path, "vq_vae")
    with pytest.raises(errors.CheckpointError, match="no checkpoint at"):
        checkpoints.load(tmp_path / "missing.pt")
