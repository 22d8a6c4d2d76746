"""What only a real GPU can show: the precision rule on the card at hand, the fp16 and bf16 paths
with CUDA kernels, no host-device sync in a VQ-VAE step, and that --deterministic makes
--resume bit-exact on CUDA. Skipped without CUDA (the default tier never needs a GPU); the GPU
check (gpu_check.py) runs this file first. tests/test_platforms.py simulates the same hardware
on the CPU."""
import json

import pytest
import torch

import vq_vae as vq
from training import checkpoints, devices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_the_rule_matches_what_the_gpu_has():
    devices.check_cuda_arch(CUDA)                    # this wheel has kernels for it
    capability = torch.cuda.get_device_capability()
    precision, line = devices.choose_precision("auto", CUDA)
    assert precision == ("bf16" if capability >= (8, 0) else
                         "fp32" if capability in devices.SLOW_FP16 else "fp16"), line
    # torch's own answer without emulation agrees on bf16
    assert devices.native_bf16(CUDA)[0] == torch.cuda.is_bf16_supported(including_emulation=False)


def test_the_training_gpus_generator_alone_is_saved_and_restored():
    torch.cuda.manual_seed(3)
    state = devices.rng_state(CUDA)
    expected = torch.randn(5, device=CUDA)
    devices.set_rng_state(state, CUDA)
    assert torch.equal(torch.randn(5, device=CUDA), expected)
    assert "cuda" not in state and state["device"].dtype == torch.uint8


@pytest.mark.parametrize("restart", [False, True])
def test_a_vq_vae_step_makes_no_host_device_sync(restart):
    torch.manual_seed(0)
    model = vq.VQVAE(3, hidden=32, res_hidden=16, res_layers=1, num_codes=64, code_dim=16,
                     restart=restart).to(CUDA)
    opt = devices.adam(model.parameters(), 1e-3, CUDA)
    x = torch.rand(16, 3, 32, 32, device=CUDA)
    vq.train_step(model, opt, x, 0.08, 0.25)                # warm-up: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vq.train_step(model, opt, x, 0.08, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode("default")


TINY = ["--dataset", "dsprites", "--limit", 2048, "--batch-size", 64, "--log-every", 4,
        "--device", "cuda", "--eval-limit", 256, "--latent", 4, "--mig-points", 0]


@pytest.mark.parametrize("precision", ["auto", "fp16", "bf16", "fp32"])
def test_the_beta_vae_trains_in_each_precision(precision, tmp_path, cli, loss_dtypes):
    seen = loss_dtypes
    out = tmp_path / "run"
    cli("beta_vae.py", *TINY, "--objective", "H", "--max-steps", 60, "--precision", precision,
        "--data-root", "data", "--out", out)
    state = checkpoints.load(out / "checkpoint.pt")
    chosen = state["args"]["precision"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen]
    assert all(d == dtype for d, _ in seen)
    assert all(d == torch.float32 for _, terms in seen for d in terms.values())
    assert state["log"][-1]["recon"] < 0.7 * state["log"][0]["recon"]
    assert ("scaler" in state) == (chosen == "fp16")
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"]["name"] == chosen and metrics["device"].startswith("cuda")


@pytest.mark.parametrize("script, flags", [
    ("beta_vae.py", ["--objective", "B", "--c-steps", 20, "--mig-points", 0]),
    ("vq_vae.py", ["--hidden", 32, "--res-hidden", 16, "--res-layers", 1, "--codes", 64,
                   "--latent", 16, "--prior-epochs", 0]),
])
def test_deterministic_resume_is_bit_exact_on_cuda(script, flags, tmp_path, cli):
    """The README's claim: with --deterministic, on the same GPU and software, a run stopped
    and resumed ends with the weights of the run that was not (the VQ-VAE's dead-code
    restarts draw from the GPU's generator, which the checkpoint carries)."""
    common = [*TINY[:-2], "--data-root", "data", "--deterministic", *flags]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(script, *common, "--max-steps", 32, "--out", straight)
    cli(script, *common, "--max-steps", 16, "--out", split)
    cli(script, *common, "--max-steps", 32, "--out", split, "--resume")
    a, b = (checkpoints.load(p / "checkpoint.pt") for p in (straight, split))
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
