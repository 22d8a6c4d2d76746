"""torchrun with two CPU processes (gloo): sharding, rank-0 outputs, identical replicas."""
import pytest
import torch

from training import checkpoints
from conftest import ROOT, torchrun

pytestmark = pytest.mark.slow          # torchrun: two processes per test


def tiny(tmp_path, out, *extra):
    return ["--data-root", tmp_path / "data", "--limit", 256, "--batch-size", 16,
            "--eval-limit", 64, "--iw-samples", 2, "--log-every", 2, "--device", "cpu",
            "--precision", "fp32", "--out", out, *extra]


@pytest.mark.parametrize("script", ["standard_vae.py", "beta_vae.py"])
def test_torchrun_writes_one_checkpoint_that_loads_in_one_process(tmp_path, script):
    out = tmp_path / "run"
    extra = ["--dataset", "dsprites"] if script == "beta_vae.py" else []
    torchrun(ROOT / script, *tiny(tmp_path, out, "--max-steps", 6, *extra))
    assert [p.name for p in out.glob("*.pt")] == ["checkpoint.pt"]
    state = checkpoints.load(out / "checkpoint.pt")
    assert state["step"] == 6 and len(state["rng_ranks"]) == 2
    kind = state["kind"]
    module = __import__(kind)
    import argparse
    model = module.build_model(argparse.Namespace(**state["args"]), 1, 64)
    model.load_state_dict(state["model"])                 # plain module state, no DDP prefix
    m = __import__("json").loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 6
    # resume under torchrun continues the step count
    torchrun(ROOT / script, *tiny(tmp_path, out, "--max-steps", 10, "--resume", *extra))
    assert checkpoints.load(out / "checkpoint.pt")["step"] == 10


def test_ranks_hold_identical_parameters_after_training(tmp_path):
    out = tmp_path / "run"
    torchrun(ROOT / "tests" / "ddp_worker.py", "fit", tmp_path,
             *tiny(tmp_path, out, "--max-steps", 5))
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = checkpoints.load(out / "checkpoint.pt")
    assert saved["step"] == 5 and saved["log"][-1]["loss"] < saved["log"][0]["loss"]
    for k in a:
        assert torch.equal(a[k], saved["model"][k]), k


def test_allreduced_gradient_equals_the_single_process_gradient_on_the_joint_batch(tmp_path):
    torchrun(ROOT / "tests" / "ddp_worker.py", "grad", tmp_path)
    for r in (0, 1):
        g = torch.load(tmp_path / f"grad{r}.pt", weights_only=True)
        assert g["scale"] > 0 and g["diff"] <= 1e-5 * g["scale"] + 1e-7, g
