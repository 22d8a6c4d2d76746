"""The Standard VAE's maths against references, and the script end to end."""
import json
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import standard_vae as sv
from training import checkpoints, devices
from training.errors import UserError


def test_analytic_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 10, generator=g)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(sv.gaussian_kl(mu, logvar), ref, rtol=1e-5, atol=1e-6)


def test_log_likelihoods_equal_torch_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 8, 8, generator=g) * 3
    x_bin = torch.bernoulli(torch.full((4, 3, 8, 8), 0.3), generator=g)
    ref = Bernoulli(logits=logits).log_prob(x_bin).flatten(1).sum(1)
    torch.testing.assert_close(sv.log_likelihood(x_bin, logits, "bce"), ref)

    x = torch.rand(4, 3, 8, 8, generator=g)
    log_sigma = torch.tensor(-1.7)
    ref = Normal(torch.sigmoid(logits), log_sigma.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(sv.log_likelihood(x, logits, "mse", log_sigma), ref)


def test_kl_warmup_schedule_values():
    assert sv.kl_weight(0, 1000) == 0.0
    assert sv.kl_weight(250, 1000) == 0.25
    assert sv.kl_weight(1000, 1000) == 1.0
    assert sv.kl_weight(5000, 1000) == 1.0
    assert sv.kl_weight(0, 0) == 1.0          # no warm-up


def test_free_bits_floors_each_dimension_but_not_the_bound():
    x = torch.zeros(2, 1, 4, 4)
    logits = torch.zeros(2, 1, 4, 4)
    mu = torch.tensor([[0.0, 3.0], [0.0, 3.0]])           # KL per dim: 0 and 4.5 nats
    logvar = torch.zeros(2, 2)
    plain = sv.vae_loss(x, logits, mu, logvar, "bce")
    floored = sv.vae_loss(x, logits, mu, logvar, "bce", free_bits=1.0)
    torch.testing.assert_close(floored["loss"] - plain["loss"], torch.tensor(1.0))
    torch.testing.assert_close(floored["neg_elbo"], plain["neg_elbo"])
    half = sv.vae_loss(x, logits, mu, logvar, "bce", kl_scale=0.5)
    torch.testing.assert_close(plain["loss"] - half["loss"], 0.5 * plain["kl"])


def _small_model(seed=0):
    torch.manual_seed(seed)
    model = sv.VAE(1, 28, 4, sv.default_widths(28, 8), hidden=32, recon="bce")
    return model.eval()


def test_iw_bound_k1_matches_elbo_in_expectation_and_tightens_with_k():
    model = _small_model()
    g = torch.Generator().manual_seed(3)
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.2), generator=g)
    draws = 400
    with torch.no_grad():
        # analytic-KL ELBO, averaged over draws of z
        elbo = torch.stack([-sv.vae_loss(x, *model(x), "bce")["neg_elbo"] for _ in range(draws)])
        iw = {k: torch.stack([sv.iw_log_likelihood(model, x, k, generator=g).mean()
                              for _ in range(draws // 4)]) for k in (1, 10, 100)}
    # K=1 is an unbiased ELBO estimate: the two means agree within a few standard errors
    se = math.sqrt(elbo.var() / len(elbo) + iw[1].var() / len(iw[1]))
    assert abs(elbo.mean() - iw[1].mean()) < 4 * se + 1e-3
    # and the bound tightens (increases) as K grows
    assert iw[1].mean() < iw[10].mean() < iw[100].mean()


def test_iw_log_weights_equal_torch_distributions():
    """One importance weight, recomputed with torch.distributions from the same noise."""
    model = _small_model(1)
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        est = sv.iw_log_likelihood(model, x, 1, generator=torch.Generator().manual_seed(9))
        mu, logvar = model.encoder(x)
        eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(9))[0]
        std = torch.exp(0.5 * logvar)
        z = mu + std * eps
        ref = (Bernoulli(logits=model.decoder(z)).log_prob(x).flatten(1).sum(1)
               + Normal(0.0, 1.0).log_prob(z).sum(1) - Normal(mu, std).log_prob(z).sum(1))
    torch.testing.assert_close(est, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 1), (64, 3)])
def test_encoder_decoder_sizes_are_derived_from_the_image(size, channels):
    model = sv.VAE(channels, size, 5, sv.default_widths(size), recon="mse")
    x = torch.rand(2, channels, size, size)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (2, 5)


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(UserError, match="unsupported image size 30"):
        sv.feature_size(30)


def test_bits_per_dim_where_defined():
    assert sv.bits_per_dim(100 * math.log(2), 100, "bce", binary=True) == pytest.approx(1.0)
    assert sv.bits_per_dim(50.0, 100, "bce", binary=False) is None
    # Gaussian: density on [0,1] to probability of an 8-bit bin
    assert sv.bits_per_dim(0.0, 10, "mse", binary=False) == pytest.approx(8.0)


def test_training_lowers_the_loss_and_resume_continues_exactly(tmp_path, cli):
    common = ["--data-root", tmp_path / "data", "--limit", 256, "--batch-size", 32,
              "--eval-limit", 64, "--iw-samples", 4, "--log-every", 2, "--device", "cpu",
              "--precision", "fp32",
              "--width", 16, "--hidden", 64, "--lr", 3e-3]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("standard_vae.py", *common, "--epochs", 2, "--out", straight)
    cli("standard_vae.py", *common, "--epochs", 1, "--out", split)
    m1 = json.loads((split / "metrics.json").read_text())
    assert m1["steps"] == 8
    cli("standard_vae.py", *common, "--epochs", 2, "--out", split, "--resume")

    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.json", "history.json",
                 "reconstructions.png", "samples.png", "losses.png", "kl_per_dim.png"):
        assert (straight / name).stat().st_size > 0, name
    m = json.loads((straight / "metrics.json").read_text())
    assert m["steps"] == 16 and m["epochs"] == 2
    test = m["test"]
    assert math.isfinite(test["neg_elbo"]) and math.isfinite(test["iw_nll"])
    assert test["bits_per_dim"] is not None and len(test["kl_per_dim"]) == 10
    assert test["neg_elbo"] == pytest.approx(test["recon"] + test["kl"])

    a = checkpoints.load(straight / "checkpoint.pt")
    b = checkpoints.load(split / "checkpoint.pt")
    assert b["step"] == a["step"] == 16
    losses = [r["loss"] for r in a["log"]]
    assert losses[-1] < 0.7 * losses[0]                     # it learns
    # a resumed run is the uninterrupted run: same batches, same noise, same weights
    assert [r["loss"] for r in b["log"]] == losses
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_missing_dataset_is_a_clear_error(tmp_path, cli):
    proc = cli("standard_vae.py", "--dataset", "cifar10", "--data-root", tmp_path,
                  "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert str(tmp_path / "cifar-10-batches-py") in proc.stderr
    assert "--dataset dsprites" in proc.stderr and "Traceback" not in proc.stderr


def test_flop_counter_matches_a_hand_count():
    """2 FLOPs per multiply-add, per image: Conv2d counts output elements x in-channels x
    kernel, ConvTranspose2d input elements x out-channels x kernel, Linear in x out features
    per row; a step adds a weight gradient for every layer and an input gradient for all but
    the first (its input, the image, needs none)."""
    import bench_tools
    torch.manual_seed(0)
    stack = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),       # (B, 8, 8, 8)
        torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),                # (B, 4, 16, 16)
        torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 5))                   # (B, 5)
    conv = (8 * 8 * 8) * (3 * 3 * 3)            # outputs x (in-channels x 3 x 3)
    deconv = (8 * 8 * 8) * (4 * 4 * 4)          # inputs x (out-channels x 4 x 4)
    linear = 1024 * 5
    flops = bench_tools.count_flops(stack, torch.rand(2, 3, 16, 16))
    assert flops["forward"] == 2 * (conv + deconv + linear) == 103_424
    assert flops["step"] == 2 * (2 * conv + 3 * deconv + 3 * linear) == 282_624
    # a Linear applied to every row of a (B, 7, 6) input counts each row
    linear_rows = bench_tools.count_flops(torch.nn.Linear(6, 3), torch.rand(4, 7, 6))
    assert linear_rows["forward"] == 2 * 7 * 18


def test_bench_runs_all_three_pipelines(tmp_path, cli):
    """baseline, ours and the limit, in fp32 and (where native) bf16, with FLOPs per image
    equal to a hand count of the standard VAE and of the beta-VAE paper's MLP."""
    import bench_tools
    out = tmp_path / "bench.json"
    cli("bench.py", "--models", "standard_vae,beta_vae_mlp", "--images", 48, "--batch-size", 16,
        "--mlp-batch-size", 16, "--steps", 1, "--repeats", 2, "--warmup", 0, "--workers", 0,
        "--peak-size", 64, "--profile-ops", 3, "--device", "cpu", "--data-root",
        tmp_path / "data", "--out", out)
    result = json.loads(out.read_text())
    native = devices.native_bf16("cpu")[0]
    # the standard VAE at 3x64x64: 4x4 stride-2 convs 3-32-32-64-64 (64 -> 4 px), FC
    # 1024-256-256-20; the decoder, FC 10-256-256-1024 and deconvs 64-64-32-32-3, mirrors the
    # encoder, and each deconv's multiply-adds equal those of the conv it mirrors
    first = 32 * 32 ** 2 * 3 * 16                 # outputs x in-channels x 4x4
    convs = first + 32 * 16 ** 2 * 32 * 16 + 64 * 8 ** 2 * 32 * 16 + 64 * 4 ** 2 * 64 * 16
    fcs = 1024 * 256 + 256 * 256 + 256 * 20 + 10 * 256 + 256 * 256 + 256 * 1024
    # the MLP at 1x64x64: 4096-1200-1200-20 and 10-1200-1200-1200-4096
    mlp = 4096 * 1200 + 1200 * 1200 + 1200 * 20 + 10 * 1200 + 2 * 1200 * 1200 + 1200 * 4096
    hand = {"standard_vae": (2 * (2 * convs + fcs), first),
            "beta_vae_mlp": (2 * mlp, 4096 * 1200)}
    for name, (forward, first_macs) in hand.items():
        r = result["models"][name]
        assert r["flops_per_image"]["forward"] == forward
        assert r["flops_per_image"]["step"] == 3 * forward - 2 * first_macs
        assert r["auto_line"].startswith("precision: ") and r["auto"] in r["rows"]
        assert set(r["rows"]) == ({"fp32", "bf16"} if native else {"fp32"})
        for prec, row in r["rows"].items():
            ours, limit = row["ours"], row["limit"]
            assert len(ours["rounds"]) == len(limit["rounds"]) == 2
            assert ours["worst"] <= ours["images_per_s"] <= ours["best"]
            assert row["ours_over_limit"]["ratio"] == pytest.approx(
                ours["images_per_s"] / limit["images_per_s"])
            assert row["ours_gflops"] == pytest.approx(r["flops_per_image"]["step"]
                                                       * ours["images_per_s"] / 1e9)
            assert row["ours_fraction_of_peak"] == pytest.approx(
                row["ours_gflops"] / result["peak_gflops"][prec])
            assert 0 < len(row["profile_limit_top_ops"]) <= 3
        assert r["auto_over_fp32"]["ratio"] == pytest.approx(
            r["rows"][r["auto"]]["ours"]["images_per_s"]
            / r["rows"]["fp32"]["ours"]["images_per_s"])
    conv = result["models"]["standard_vae"]["rows"]
    mlp_rows = result["models"]["beta_vae_mlp"]["rows"]
    assert conv["fp32"]["baseline"]["images_per_s"] > 0 and "baseline" not in mlp_rows["fp32"]
    for row in conv.values():              # channels-last timed beside the scripts' format
        formats = row["memory_formats"]
        assert formats["channels_last_over_contiguous"]["ratio"] == pytest.approx(
            formats["ours_channels_last"]["images_per_s"]
            / formats["ours_contiguous"]["images_per_s"])
    for row in mlp_rows.values():          # the TC estimator's share of the step
        assert "memory_formats" not in row and 0 < row["tc_share_of_step"] < 1
    machine = result["machine"]
    assert machine["cpu"] and set(machine["cpu_flags"]) == set(bench_tools.CPU_FLAGS)
    peak = result["peak_gflops"]
    for prec in ("fp32", "bf16"):           # the faster of the two kernels
        assert peak[prec] == max(peak[prec + "_parts"].values()) > 0
    assert result["decode_and_cache_s"] > 0
