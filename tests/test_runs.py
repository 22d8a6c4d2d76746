"""How runs behave around training: progress reports, sizes that follow the run's length,
evaluation sums without float64 (Apple MPS), the precision rule on this CPU, and the GPU-only
paths (bf16 autocast, channels-last, fused Adam, torch.compile) exercised on the CPU."""
import argparse
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import beta_vae as bv
import pixelcnn_prior as pp
import standard_vae as sv
import vq_vae as vq
from training import checkpoints, devices, distributed, progress, sizes
from training.errors import UserError


# ---- progress --------------------------------------------------------------------------------
def test_progress_off_a_terminal_is_a_few_plain_lines(capsys, monkeypatch):
    with progress.bar(total=4, desc="phase", unit="batch", what="8 images", announce=True,
                      tty=False) as bar:
        for _ in range(4):
            bar.update(1)
    assert capsys.readouterr().out.splitlines() == [
        "phase: 4 batches, 8 images", "phase: done: 4 batches in 0 s"]

    for _ in progress.bar(range(3), desc="quick", tty=False):    # short phases stay silent
        pass
    assert capsys.readouterr().out == ""

    with pytest.raises(KeyboardInterrupt):                        # a phase cut short says so
        with progress.bar(total=4, desc="cut", announce=True, tty=False) as bar:
            bar.update(1)
            raise KeyboardInterrupt
    assert capsys.readouterr().out.splitlines() == ["cut: 4 its", "cut: stopped after 1 it in 0 s"]

    monkeypatch.setattr(progress.Lines, "QUIET_S", 0.0)            # a phase that is slow
    for _ in progress.bar(range(20), desc="slow", unit="image", tty=False):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("slow: 20 images, about ") and lines[0].endswith(" left")
    assert lines[-1].startswith("slow: done: 20 images in ") and len(lines) == 2


def test_progress_is_a_bar_on_a_terminal_and_silent_off_rank_0(capsys, monkeypatch):
    for _ in progress.bar(range(3), desc="bar", tty=True, announce=True):
        pass
    out = capsys.readouterr()
    assert out.out == "" and "bar: 100%" in out.err                # tqdm draws on stderr
    monkeypatch.setattr(distributed.DIST, "rank", 1)               # this process as rank 1
    monkeypatch.setattr(distributed.DIST, "world", 2)
    for _ in progress.bar(range(3), desc="rank 1", tty=False, announce=True):
        pass
    for _ in progress.bar(range(3), desc="rank 1", tty=True, announce=True):
        pass
    assert capsys.readouterr() == ("", "")


# ---- sizes that follow the run ---------------------------------------------------------------
def test_held_out_and_iw_nll_sizes_follow_the_run():
    # (--batch-size, --epochs, --max-steps, training images)
    assert sizes.run_images(64, 30, None, 663_552) == (30 * 10_368 * 64, 10_368 * 64)
    assert sizes.run_images(64, 30, 10, 663_552) == (640, 663_552)
    assert sizes.held_out_size(None, 640, 663_552) == 1_000                # a 10-step run
    assert sizes.held_out_size(None, 3_000 * 64, 663_552) == 10_000        # a real run
    assert sizes.held_out_size(None, 72_000, 2_400) == 2_400               # one small epoch
    assert sizes.held_out_size(500, 640, 663_552) == 500                   # as typed
    assert sizes.iw_size(None, 10_000, 600_000, 100) == 10_000             # 10 MNIST epochs
    assert sizes.iw_size(None, 1_000, 1_280, 100) == 100                   # a 10-step run
    assert sizes.iw_size(None, 1_000, 10_000, 100) == 300
    assert sizes.iw_size(50, 1_000, 1_280, 100) == 50 and sizes.iw_size(5_000, 64, 0, 4) == 64


def test_vq_prior_is_bounded_like_the_vq_vae_unless_told_otherwise():
    # (--prior-epochs, --prior-max-steps, --epochs, --max-steps)
    assert sizes.prior_length(None, None, 30, 10) == (sizes.PRIOR_EPOCHS, 10)
    assert sizes.prior_length(None, None, 2, None) == (2, None)
    assert sizes.prior_length(0, 7, 2, None) == (0, 7)
    # its held-out grids: (held-out, grids it trains on, grids an epoch, --eval-limit given)
    assert sizes.prior_held_out(1_792, 1_280, 1_280) == 1_280        # the 10-step command
    assert sizes.prior_held_out(10_000, 50 * 128, 640) == 1_000       # at least the floor
    assert sizes.prior_held_out(10_000, 10 * 663_552, 663_552) == 10_000      # a real run
    assert sizes.prior_held_out(1_792, 1_280, 1_280, given=True) == 1_792
    # its network: (--prior-channels, --prior-layers, the prior's steps); typed flags win
    assert sizes.prior_network(None, None, 10) == sizes.PRIOR_SHORT == (32, 4)   # 10-step run
    assert sizes.prior_network(None, None, 999) == sizes.PRIOR_SHORT
    assert sizes.prior_network(None, None, 1_000) == sizes.PRIOR_NETWORK == (128, 12)
    assert sizes.prior_network(64, None, 10) == (64, 4)
    assert sizes.prior_network(None, 6, 50_000) == (128, 6)


def test_vq_prior_network_follows_its_planned_steps(capsys):
    """The 10-step command on 2,000 dSprites images: the prior draws 10 batches of 128 grids,
    so it encodes 1,280 of them and gets the short network, said; a typed size is kept."""
    assert pp.prior_plan(2_000, 10, 10, 128) == (1_280, 1_280, 10)
    assert pp.prior_plan(663_552, 10, None, 128) == (663_552, 663_552, 51_840)
    args = argparse.Namespace(prior_channels=None, prior_layers=None, prior_kernel=5)
    config = pp.prior_config(args, 512, (16, 16), 3, steps=10)
    assert (config["channels"], config["layers"], config["num_classes"]) == (32, 4, 3)
    assert "prior network: 32 channels, 4 gated layers (sized to its 10 steps" in \
        capsys.readouterr().out
    args.prior_channels, args.prior_layers = 64, 6
    config = pp.prior_config(args, 512, (16, 16), 0, steps=10)
    assert (config["channels"], config["layers"]) == (64, 6) and capsys.readouterr().out == ""


# ---- evaluation without float64 --------------------------------------------------------------
class DtypeLog(TorchDispatchMode):
    """Records the dtype of every tensor any operation makes."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


class Float64Sums:
    """The accumulation before distributed.Sums: plain float64 sums, the reference."""

    def __init__(self, n, device):
        self.total = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, values):
        self.total += values.double()

    def read(self):
        return self.total.numpy()


def test_compensated_sums_keep_float64_accuracy_in_float32():
    g = torch.Generator().manual_seed(0)
    values = 1000 + torch.rand(20_000, 2, generator=g)
    sums, naive = distributed.Sums(2, "cpu"), torch.zeros(2)
    for v in values:
        sums.add(v)
        naive += v
    exact = values.double().sum(0).numpy()
    assert np.abs(sums.read() / exact - 1).max() < 1e-9
    assert np.abs(naive.double().numpy() / exact - 1).max() > 1e-6    # what it guards against


def small_images(n, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_vae_evaluation_makes_no_float64_tensor_and_equals_float64_sums(recon, monkeypatch):
    torch.manual_seed(0)
    model = sv.VAE(1, 28, 4, sv.default_widths(28, 8), hidden=32, recon=recon)
    images = small_images(1_300, 1, 28)
    binarize = recon == "bce"
    log = DtypeLog()
    with log:
        result = sv.evaluate(model, images, torch.device("cpu"), 0, binarize, False, 3, 90)
    assert torch.float64 not in log.dtypes and torch.float32 in log.dtypes
    monkeypatch.setattr(distributed, "Sums", Float64Sums)
    reference = sv.evaluate(model, images, torch.device("cpu"), 0, binarize, False, 3, 90)
    assert result["images"] == 1_300 and result["iw_images"] == 90
    for key in ("neg_elbo", "recon", "kl", "iw_nll"):
        assert result[key] == pytest.approx(reference[key], rel=1e-6), key
    assert result["kl_per_dim"] == pytest.approx(reference["kl_per_dim"], rel=1e-6)
    assert result["active_units"] == reference["active_units"]


def test_vq_evaluation_makes_no_float64_tensor_and_equals_float64_sums(monkeypatch):
    torch.manual_seed(0)
    model = vq.VQVAE(1, hidden=16, res_hidden=8, res_layers=1, num_codes=32, code_dim=8)
    images = small_images(700, 1, 32)
    log = DtypeLog()
    with log:
        result = vq.evaluate(model, images, 0.08, 64, torch.device("cpu"))
    assert torch.float64 not in log.dtypes
    monkeypatch.setattr(distributed, "Sums", Float64Sums)
    reference = vq.evaluate(model, images, 0.08, 64, torch.device("cpu"))
    for key in ("recon_error", "psnr", "perplexity", "batch_perplexity"):
        assert result[key] == pytest.approx(reference[key], rel=1e-6), key
    assert result["code_counts"] == reference["code_counts"]
    assert sum(result["code_counts"]) == 700 * 8 * 8


# ---- precision: chosen by a rule on the hardware (tests/test_platforms.py simulates others) ---
def test_auto_precision_on_this_cpu_follows_its_flags():
    flags = devices.cpu_flags()
    native, why = devices.native_bf16("cpu")
    assert native == bool(flags & {"amx_bf16", "avx512_bf16"}) and why.startswith("CPU has")
    precision, line = devices.choose_precision("auto", "cpu")
    assert precision == ("bf16" if native else "fp32") and line == f"precision: {precision} " \
        f"(auto: {why})"
    assert devices.choose_precision("auto", "cpu") == (precision, line)     # no timing in it


# ---- the GPU paths, run on the CPU -----------------------------------------------------------
TINY = ["--dataset", "dsprites", "--limit", 512, "--batch-size", 32, "--log-every", 4,
        "--device", "cpu", "--precision", "fp32"]


def test_bf16_autocast_channels_last_and_fused_adam_train_on_cpu(tmp_path, monkeypatch):
    """--precision bf16 and the paths a GPU takes (devices.FAST_PATHS), through the real
    training loop: the model runs in bf16 on channels-last batches, the loss terms stay fp32,
    the loss falls, and the optimiser is the fused Adam. (The CPU is taken as native bf16;
    where it is emulated these 26 tiny steps are slow, not wrong.)"""
    monkeypatch.setattr(devices, "FAST_PATHS", {"cuda", "cpu"})
    monkeypatch.setattr(devices, "native_bf16", lambda device: (True, "taken as native"))
    TINY = [*globals()["TINY"], "--precision", "bf16"]
    seen = []

    def loss(x, logits, mu, logvar, *settings, **named):
        terms = bv_loss(x, logits, mu, logvar, *settings, **named)
        seen.append((logits.dtype, x.is_contiguous(memory_format=torch.channels_last),
                     {k: v.dtype for k, v in terms.items() if torch.is_tensor(v)}))
        return terms

    bv_loss = bv.beta_vae_loss
    monkeypatch.setattr(bv, "beta_vae_loss", loss)
    out = tmp_path / "beta"
    bv.main(bv.parse_args([*map(str, TINY), "--eval-limit", "64",
                           "--data-root", str(tmp_path / "data"),
                           "--max-steps", "20", "--latent", "4", "--objective", "H",
                           "--out", str(out)]))
    assert all(dtype == torch.bfloat16 and nhwc for dtype, nhwc, _ in seen)
    assert all(d == torch.float32 for *_, terms in seen for d in terms.values())
    log = checkpoints.load(out / "checkpoint.pt")["log"]
    assert log[-1]["recon"] < 0.6 * log[0]["recon"]
    state = checkpoints.load(out / "checkpoint.pt")["optimizer"]
    assert state["param_groups"][0]["fused"] is True

    # the VQ-VAE under the same paths (its prior samples too slowly in bf16 on a CPU)
    metrics = vq.main(vq.parse_args([*map(str, TINY), "--eval-limit", "64",
                                     "--data-root", str(tmp_path / "data"),
                                     "--max-steps", "6", "--hidden", "16", "--res-hidden", "8",
                                     "--res-layers", "1", "--codes", "32", "--latent", "8",
                                     "--prior-epochs", "0", "--out", str(tmp_path / "vq")]))
    assert metrics["steps"] == 6 and np.isfinite(metrics["test"]["recon_error"])
    log = checkpoints.load(tmp_path / "vq" / "checkpoint.pt")["log"]
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("name, flags", [
    ("standard_vae.py", ["--iw-samples", 2, "--width", 8, "--hidden", 32]),
    ("beta_vae.py", ["--hidden", 32, "--objective", "TC"]),
    ("vq_vae.py", ["--hidden", 16, "--res-hidden", 8, "--res-layers", 1, "--codes", 32,
                   "--latent", 8, "--prior-channels", 16, "--prior-layers", 3,
                   "--prior-kernel", 3, "--prior-batch-size", 32]),
])
def test_each_script_runs_compiled(name, flags, tmp_path, script):
    """--compile end to end (inductor on the CPU): training, evaluation, outputs."""
    out = tmp_path / "run"
    proc = script(name, *TINY, "--data-root", tmp_path / "data", "--max-steps", 4, "--latent",
                  8 if name == "vq_vae.py" else 4, "--compile", *flags, "--out", out,
                  env={"OMP_NUM_THREADS": "1"}, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["args"]["compile"] is True
    if name == "vq_vae.py":                             # --max-steps bounds the prior too
        assert metrics["prior"]["steps"] == 4
    assert "Traceback" not in proc.stderr
    for line in ("held-out evaluation: 1,000 images", f"{name[:-3]}: 4 steps, 32 images each",
                 f"{name[:-3]}: done: 4 steps in "):
        assert line in proc.stdout, (line, proc.stdout)


@pytest.mark.parametrize("name", ["standard_vae", "beta_vae", "vq_vae", "beta_vae_analyze",
                                  "bench"])
def test_help_lists_every_flag_with_its_default(name, capsys):
    module = __import__(name)
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())     # argparse wraps lines anywhere
    flags = [a for line in text.split("[")[1:] for a in line.split("]")[:1]]
    assert len(flags) >= 5 and all(f.split()[0] in text.split("options:")[1] for f in flags)
    if name in ("standard_vae", "vq_vae"):                # one help style: defaults are shown
        assert "--seed SEED random seed (default: 0)" in text
        assert "(default: (default:" not in text and "default: None" not in text


def test_typed_flags_are_recorded_in_one_parse_and_resume_honours_them():
    args = sv.parse_args(["--epochs", "10", "--precision", "fp32"])     # 10 is the default
    assert args.given == ["epochs", "precision"] and (args.epochs, args.lr) == (10, 1e-3)
    assert sv.parse_args([]).given == [] and sv.parse_args([]).compile is False

    saved = {"args": vars(sv.parse_args(["--epochs", "30", "--lr", "1e-4"]))}
    resumed = checkpoints.resume_args(sv.parse_args(["--resume", "--epochs", "10"]), saved,
                                      sv.RESUME_FLAGS)
    assert (resumed.epochs, resumed.lr) == (10, 1e-4)           # typed default wins, rest saved

    # a flag that shapes the model, typed at its default against a checkpoint that differs
    saved = {"args": vars(sv.parse_args(["--latent", "32"]))}
    with pytest.raises(UserError, match="--latent cannot change on --resume"):
        checkpoints.resume_args(sv.parse_args(["--resume", "--latent", "10"]), saved,
                                sv.RESUME_FLAGS)
