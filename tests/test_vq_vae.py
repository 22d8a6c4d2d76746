"""VQ-VAE: the EMA codebook against the textbook formulas, the straight-through gradient, dead-code
restart, the PixelCNN prior's causality, the script end to end, and under torchrun."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import pixelcnn_prior as pp
import utils
import vq_vae as vq
from training import checkpoints, devices
from training.errors import UserError
from conftest import ROOT, collapsed_quantizer, torchrun

# Subprocess runs use one thread: the tensors of the tiny configurations are too small to gain
# from more, and two busy OpenMP pools on a 2-core machine slow each other down many times over.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- EMA codebook -----------------------------------------------------------------------------
def textbook_ema(count, total, flat, indices, decay, eps):
    """The EMA update of van den Oord et al. 2017 (appendix A.1) with the Laplace-smoothed
    counts of the authors' Sonnet quantiser (docs/papers.md), written out one code at a time:
    N_i <- d N_i + (1-d) n_i ; m_i <- d m_i + (1-d) sum of z_e assigned to i ;
    e_i = m_i / N_i', N_i' = (N_i + eps) / (sum N + K eps) * sum N."""
    k = len(count)
    new_count, new_total = [], []
    for i in range(k):
        assigned = [flat[j] for j in range(len(flat)) if indices[j] == i]
        n_i = len(assigned)
        s_i = sum(assigned, torch.zeros(flat.shape[1], dtype=flat.dtype))
        new_count.append(decay * count[i] + (1 - decay) * n_i)
        new_total.append(decay * total[i] + (1 - decay) * s_i)
    n_sum = sum(new_count)
    smoothed = [(n + eps) / (n_sum + k * eps) * n_sum for n in new_count]
    codebook = torch.stack([m / n for m, n in zip(new_total, smoothed)])
    return torch.tensor(new_count, dtype=flat.dtype), torch.stack(new_total), codebook


def hand_made_quantizer(count, total, decay=0.9, eps=vq.LAPLACE_EPS):
    q = vq.VectorQuantizer(len(count), total.shape[1], "ema", decay=decay, eps=eps, restart=False)
    q = q.double()
    q.ema_count.copy_(count)
    q.ema_sum.copy_(total)
    return q


# five encoder outputs in 2-D, assigned by hand to codes 0, 0, 1, 1, 1 (code 2 gets none)
FLAT = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.0]],
                    dtype=torch.float64)
INDICES = torch.tensor([0, 0, 1, 1, 1])


@pytest.mark.parametrize("eps", [0.0, vq.LAPLACE_EPS, 0.5])
def test_ema_update_equals_the_textbook_formulas(eps):
    count = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    total = torch.tensor([[2.0, 2.0], [0.5, -0.5], [-1.0, 3.0]], dtype=torch.float64)
    q = hand_made_quantizer(count, total, eps=eps)
    q.ema_update(FLAT, INDICES)
    ref_count, ref_total, ref_codebook = textbook_ema(count.tolist(), total, FLAT, INDICES, 0.9,
                                                      eps)
    torch.testing.assert_close(q.ema_count, ref_count, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.ema_sum, ref_total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.codebook, ref_codebook, rtol=1e-12, atol=1e-12)
    if eps == 0.0:   # no smoothing: e_i = m_i / N_i exactly as written in the paper
        torch.testing.assert_close(q.codebook, ref_total / ref_count[:, None])
    else:            # smoothing moves the codes, visibly so for a large eps
        assert not torch.allclose(q.codebook, ref_total / ref_count[:, None], rtol=0, atol=1e-13)


def test_smoothing_keeps_the_raw_counts_and_rescues_an_empty_code():
    count = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)      # code 2 never used
    total = torch.tensor([[2.0, 2.0], [0.5, -0.5], [0.0, 0.0]], dtype=torch.float64)
    plain = hand_made_quantizer(count, total, eps=0.0)
    smoothed = hand_made_quantizer(count, total, eps=0.5)
    for _ in range(2):        # two steps: a smoothed count written back would compound
        plain.ema_update(FLAT, INDICES)
        smoothed.ema_update(FLAT, INDICES)
    raw = count
    for _ in range(2):
        raw = 0.9 * raw + 0.1 * torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64)
    # the buffers hold the raw counts, the same with and without smoothing
    assert torch.equal(smoothed.ema_count, plain.ema_count)
    torch.testing.assert_close(smoothed.ema_count, raw, rtol=1e-12, atol=0)
    assert smoothed.ema_count[2] == 0
    # the empty code's division 0/0 is a NaN without smoothing and a finite 0 with it
    assert plain.codebook[2].isnan().all()
    assert torch.equal(smoothed.codebook[2], torch.zeros(2, dtype=torch.float64))
    _, _, ref = textbook_ema(raw.tolist(), smoothed.ema_sum, FLAT[:0], INDICES[:0], 1.0, 0.5)
    torch.testing.assert_close(smoothed.codebook, ref, rtol=1e-12, atol=1e-12)


def test_training_forward_applies_the_update_to_the_nearest_codes_and_eval_changes_nothing():
    torch.manual_seed(0)
    q = vq.VectorQuantizer(8, 3, "ema", decay=0.95, restart=False).double()
    z_e = torch.randn(2, 3, 4, 5, dtype=torch.float64)                   # (B, D, H, W)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    _, indices, _ = q(z_e)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"
    q.train()
    q(z_e)
    count, total, codebook = textbook_ema(before["ema_count"].tolist(), before["ema_sum"], flat,
                                          indices.flatten(), 0.95, vq.LAPLACE_EPS)
    torch.testing.assert_close(q.ema_count, count)
    torch.testing.assert_close(q.codebook, codebook)


# ---- quantiser --------------------------------------------------------------------------------
def test_decoder_gradient_reaches_the_encoder_output_unchanged():
    torch.manual_seed(0)
    for codebook in ("ema", "loss"):
        model = vq.VQVAE(1, hidden=8, res_hidden=4, res_layers=1, num_codes=16, code_dim=4,
                         codebook=codebook)
        x = torch.rand(3, 1, 28, 28) - 0.5
        z_e = model.encoder(x)
        z_e.retain_grad()
        q, _, terms = model.quantizer(z_e)
        q.retain_grad()
        F.mse_loss(model.decoder(q), x).backward()
        assert torch.equal(z_e.grad, q.grad)              # straight through, bit for bit
        if codebook == "loss":                            # and none of it reaches the codebook
            assert model.quantizer.codebook.grad is None


def test_commitment_gradient_pulls_the_encoder_output_towards_its_code():
    q = vq.VectorQuantizer(4, 2, "loss", restart=False)
    z_e = torch.randn(1, 2, 3, 3, requires_grad=True)
    quantized, _, terms = q(z_e)
    terms["commitment"].backward()
    expected = 2 * (z_e - quantized).detach() / z_e.numel()   # d/dz mean((z - sg[e])^2)
    torch.testing.assert_close(z_e.grad, expected)


def test_eval_output_is_the_codebook_lookup_of_the_nearest_codes():
    torch.manual_seed(1)
    for codebook in ("ema", "loss"):
        q = vq.VectorQuantizer(32, 6, codebook).eval()
        z_e = torch.randn(4, 6, 5, 5)
        quantized, indices, _ = q(z_e)
        lookup = q.codebook[indices].permute(0, 3, 1, 2)         # (B, D, H, W)
        assert torch.equal(quantized, lookup)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 6).double()
        assert torch.equal(indices.flatten(), torch.cdist(flat, q.codebook.double()).argmin(1))


def test_distances_are_computed_in_fp32_under_autocast():
    """Codes 1e-2 apart around 1: the expanded distance ||z||^2 - 2 z.e + ||e||^2 tells them
    apart in fp32 but not when autocast runs the product in bf16."""
    g = torch.Generator().manual_seed(2)
    q = vq.VectorQuantizer(64, 8, "ema").eval()
    q.codebook.copy_(1 + 1e-2 * torch.randn(64, 8, generator=g))
    z_e = 1 + 1e-2 * torch.randn(4, 8, 4, 4, generator=g)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
    exact = torch.cdist(flat.double(), q.codebook.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = q.codebook
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)
        unguarded = dist.argmin(1)
        _, indices, _ = q(z_e)
    assert (unguarded != exact).float().mean() > 0.5      # bf16 would pick wrong codes
    assert torch.equal(indices.flatten(), exact)


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_dead_code_restart_revives_a_collapsed_codebook(codebook):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 4, 4, 4, generator=g) for _ in range(3)]     # (B, D, H, W)

    def used_after_training(restart, seed=0):
        q = collapsed_quantizer(codebook, restart)
        weights = q.codebook                      # the very tensor, not a copy
        torch.manual_seed(seed)
        for z in batches[:2]:
            q(z)
        q.eval()
        _, indices, _ = q(batches[2])
        assert q.codebook is weights              # restarted in place, never re-created
        return q, indices.unique().numel()

    q, used = used_after_training(restart=True)
    _, used_without = used_after_training(restart=False)
    assert used_without == 1                      # the collapse persists without restart
    assert used >= 12                             # and restart revives most of the 16 codes
    assert (q.ema_count >= 1.0).all()             # no code is left below the threshold
    # deterministic given the torch RNG
    q2, _ = used_after_training(restart=True)
    assert torch.equal(q.codebook, q2.codebook)
    q3, _ = used_after_training(restart=True, seed=1)
    assert not torch.equal(q.codebook, q3.codebook)


def test_restarted_code_is_exactly_a_batch_vector_with_consistent_ema_stats():
    q = collapsed_quantizer("ema", restart=True)
    flat = torch.randn(50, 4)
    q.restart_dead_codes(flat, q.nearest(flat)[1])
    for i in range(1, 16):
        assert (flat == q.codebook[i]).all(1).any(), i       # an encoder output, bit for bit
    assert torch.equal(q.codebook[0], torch.zeros(4))        # the live code is untouched
    assert torch.equal(q.ema_count[1:], torch.ones(15))      # count set to the threshold...
    torch.testing.assert_close(q.ema_sum[1:] / q.ema_count[1:, None], q.codebook[1:])  # m/N = e


def test_restart_seeds_where_the_codebook_quantises_worst():
    """1000 encoder outputs sit exactly on the live code (distance 0), 10 lie far away: the
    dead codes are re-seeded from the 10, not piled onto copies of the well-served vector."""
    q = collapsed_quantizer("ema", restart=True)
    far = torch.randn(10, 4) + 5
    flat = torch.cat([torch.zeros(1000, 4), far])
    torch.manual_seed(0)
    q.restart_dead_codes(flat, q.nearest(flat)[1])
    for e in q.codebook[1:]:
        assert (far == e).all(1).any()


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_the_optimizer_holds_the_parameters_the_model_uses(codebook):
    torch.manual_seed(0)
    model = vq.VQVAE(1, hidden=8, res_hidden=4, res_layers=1, num_codes=16, code_dim=4,
                     codebook=codebook)
    opt = devices.adam(model.parameters(), 1e-2, "cpu")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 28, 28)
    for _ in range(3):
        vq.train_step(model, opt, x, data_variance=0.1, beta=0.25)
    held = [p for group in opt.param_groups for p in group["params"]]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]
    assert all(model.get_parameter(k) is p for k, p in params.items())    # none re-created
    assert all(model.get_buffer(k) is b for k, b in buffers.items())
    assert ("quantizer.codebook" in params) == (codebook == "loss")
    for k, v in model.state_dict().items():      # every weight and the codebook were trained
        assert not torch.equal(v, start[k]), f"{k} never changed"
    assert all(opt.state[p]["step"] == 3 for p in held)


def test_encoder_decoder_support_28_32_and_64_pixels():
    for size, channels in [(28, 1), (32, 3), (64, 1)]:
        model = vq.VQVAE(channels, hidden=8, res_hidden=4, res_layers=2, num_codes=8, code_dim=4)
        recon, indices, _ = model(torch.rand(2, channels, size, size))
        assert recon.shape == (2, channels, size, size)
        assert indices.shape == (2, size // 4, size // 4)
    with pytest.raises(UserError, match="unsupported image size 30"):
        vq.grid_size(30)


def test_loss_is_the_papers_objective():
    x, recon = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.2)
    terms = {"commitment": torch.tensor(2.0), "codebook": torch.tensor(3.0),
             "perplexity": torch.tensor(1.0), "used": torch.tensor(1.0)}
    out = vq.vq_vae_loss(x, recon, terms, data_variance=0.04, beta=0.25)
    torch.testing.assert_close(out["recon_error"], torch.tensor(1.0))      # 0.04 / 0.04
    torch.testing.assert_close(out["loss"], torch.tensor(1.0 + 3.0 + 0.25 * 2.0))


def test_perplexity_counts_effective_codes():
    assert vq.perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert vq.perplexity(torch.tensor([7.0, 0.0, 0.0])).item() == pytest.approx(1.0)


# ---- PixelCNN prior ---------------------------------------------------------------------------
def small_prior(num_classes=0, layers=4):
    torch.manual_seed(0)
    prior = pp.GatedPixelCNN(5, channels=8, layers=layers, kernel=3, num_classes=num_classes)
    return prior.double()


def influence(prior, codes, labels=None):
    """influence[p, t]: changing the code at raster position p changes the logits at position t."""
    h, w = codes.shape[1:]
    with torch.no_grad():
        base = prior(codes, labels)
        out = torch.zeros(h * w, h * w, dtype=torch.bool)
        for p in range(h * w):
            changed = codes.clone()
            changed[0, p // w, p % w] = (changed[0, p // w, p % w] + 1) % 5
            diff = (prior(changed, labels) - base)[0].abs().amax(0)          # (H, W)
            out[p] = diff.flatten() > 1e-10
    return out


def test_pixelcnn_is_causal_in_raster_order():
    prior = small_prior(num_classes=2)
    codes = torch.randint(0, 5, (1, 6, 7), generator=torch.Generator().manual_seed(0))
    inf = influence(prior, codes, torch.tensor([1]))
    n = inf.shape[0]
    for p in range(n):
        assert not inf[p, :p + 1].any(), f"code {divmod(p, 7)} reaches an earlier logit"
    assert inf[:n - 1].any(1).all()              # and every code informs some later position


def test_pixelcnn_has_no_blind_spot():
    """The original masked PixelCNN cannot see up and to the right; the two stacks can."""
    prior = small_prior(layers=4)
    codes = torch.randint(0, 5, (1, 6, 7), generator=torch.Generator().manual_seed(1))
    inf = influence(prior, codes)
    i, j = 3, 3
    for a, b in [(2, 4), (2, 5), (1, 5), (2, 3), (2, 2), (1, 1), (3, 2), (3, 1)]:
        assert inf[a * 7 + b, i * 7 + j], f"({a}, {b}) does not reach ({i}, {j})"


def test_pixelcnn_rows_above_do_not_need_rows_below():
    """Sampling runs the prior on rows 0..i only; that must give the full grid's logits."""
    prior = small_prior(num_classes=3)
    codes = torch.randint(0, 5, (2, 5, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        full = prior(codes, labels)
        for i in range(5):
            torch.testing.assert_close(prior(codes[:, :i + 1], labels), full[:, :, :i + 1])
        other = prior(codes, torch.tensor([1, 1]))
    assert not torch.allclose(full[0], other[0])            # the class changes the prediction


def test_row_sampler_draws_what_full_passes_drew():
    """The fast sampler (one vertical pass per row, then the horizontal stack on that row
    alone) gives each position the logits of a full pass over rows 0..i, and so draws exactly
    the codes that the sampler of full passes drew with the same seed."""
    prior = small_prior(num_classes=3, layers=3).float()
    labels = torch.tensor([0, 2, 1, 1])
    gen = torch.Generator().manual_seed(3)
    expected = torch.zeros(4, 5, 6, dtype=torch.long)
    with torch.no_grad():
        for i in range(5):                      # the sampler before it: a pass per position
            logits_at = prior.row_sampler(expected, i, labels)
            for j in range(6):
                full = prior(expected[:, :i + 1], labels)[:, :, i, j]
                torch.testing.assert_close(logits_at(j), full, rtol=1e-5, atol=1e-6)
                expected[:, i, j] = torch.multinomial(full.softmax(1), 1, generator=gen)[:, 0]
    drawn = pp.sample_codes(prior, 4, (5, 6), labels, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected) and len(expected.unique()) > 1


def test_prior_nll_is_log_k_for_a_uniform_prior():
    prior = small_prior()
    with torch.no_grad():
        for p in prior.head[-1].parameters():
            p.zero_()                                        # all logits 0: uniform over 5 codes
        codes = torch.randint(0, 5, (3, 4, 4))
        assert pp.prior_nll(prior, codes).item() == pytest.approx(math.log(5))


# ---- the script end to end --------------------------------------------------------------------
TINY = ["--limit", 256, "--batch-size", 32, "--eval-limit", 64, "--hidden", 16, "--res-hidden", 8,
        "--res-layers", 1, "--codes", 32, "--latent", 8, "--prior-channels", 16,
        "--prior-layers", 3, "--prior-kernel", 3, "--prior-batch-size", 32, "--prior-conditional",
        "--log-every", 2, "--device", "cpu", "--precision", "fp32"]


def png_size(path):
    import matplotlib.image
    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


def test_vq_vae_and_prior_end_to_end_and_resume(tmp_path, cli):
    common = ["--data-root", tmp_path / "data", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("vq_vae.py", *common, "--epochs", 2, "--prior-epochs", 1, "--out", straight)
    for name in ("checkpoint.pt", "prior.pt", "metrics.json", "history.json", "losses.png",
                 "reconstructions.png", "code_usage.png", "samples.png", "prior_losses.png",
                 "prior_history.json"):
        assert (straight / name).stat().st_size > 0, name
    # 32 originals above their reconstructions and 64 samples: 8 x 8 tiles of 64 px
    assert png_size(straight / "reconstructions.png") == png_size(straight / "samples.png") \
        == (8 * 66 + 2, 8 * 66 + 2)

    m = json.loads((straight / "metrics.json").read_text())
    test = m["test"]
    assert m["steps"] == 16 and m["epochs"] == 2 and test["images"] == 64
    assert 0 < test["recon_error"] < 10 and math.isfinite(test["psnr"]) and test["psnr"] > 0
    assert test["recon_error"] == pytest.approx(test["mse"] / m["data_variance"])
    assert 1 <= test["perplexity"] <= test["used_codes"] <= 32
    assert sum(test["code_counts"]) == 64 * 16 * 16
    assert test["used_codes"] == sum(c > 0 for c in test["code_counts"])
    prior = m["prior"]
    assert prior["uniform_bits_per_code"] == 5.0                               # log2(32)
    assert 0 < prior["test_bits_per_code"] < 5.5
    assert prior["steps"] == 8 and prior["config"]["num_classes"] == 3

    history = json.loads((straight / "history.json").read_text())
    assert [h["step"] for h in history] == [8, 16]
    assert history[1]["test_recon_error"] < history[0]["test_recon_error"]      # it learns
    # the prior's checkpoint rebuilds the prior from its config alone and carries the VQ-VAE
    state = checkpoints.load(straight / "prior.pt")
    assert state["kind"] == "vq_vae_prior" and state["vq_step"] == 16
    pp.build_prior(state["config"]).load_state_dict(state["model"])
    model = vq.build_model(argparse.Namespace(**state["args"]), channels=1)
    model.load_state_dict(state["vqvae"])

    # stopped after one epoch without a prior, then resumed: the same run, bit for bit
    cli("vq_vae.py", *common, "--epochs", 1, "--prior-epochs", 0, "--out", split)
    assert not (split / "prior.pt").exists()
    cli("vq_vae.py", *common, "--epochs", 2, "--prior-epochs", 1, "--out", split, "--resume")
    a = checkpoints.load(straight / "checkpoint.pt")
    b = checkpoints.load(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 16
    assert [r["loss"] for r in b["log"]] == [r["loss"] for r in a["log"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    pa, pb = state, checkpoints.load(split / "prior.pt")
    for k in pa["model"]:
        assert torch.equal(pa["model"][k], pb["model"][k]), k

    # the prior resumes too; a VQ-VAE trained further makes the old prior stale: a clear error
    cli("vq_vae.py", *common, "--epochs", 2, "--prior-epochs", 2, "--out", split, "--resume")
    assert checkpoints.load(split / "prior.pt")["step"] == 16
    assert [h["step"] for h in json.loads((split / "prior_history.json").read_text())] == [8, 16]
    proc = cli("vq_vae.py", *common, "--epochs", 3, "--prior-epochs", 2, "--out", split,
                  "--resume", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "another VQ-VAE state" in proc.stderr and "prior.pt" in proc.stderr


def test_bad_flags_are_clear_errors(tmp_path, cli):
    proc = cli("vq_vae.py", "--prior-kernel", 4, "--out", tmp_path, check=False)
    assert proc.returncode == 1 and "--prior-kernel must be odd" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- torchrun: two CPU processes (gloo) -------------------------------------------------------
# 256 images, 16 per rank and step: 8 steps per epoch on each of the two ranks
DDP_TINY = ["--limit", 256, "--batch-size", 16, "--eval-limit", 64, "--hidden", 16,
            "--res-hidden", 8, "--res-layers", 1, "--codes", 32, "--latent", 8,
            "--log-every", 2, "--device", "cpu", "--precision", "fp32"]
DDP_PRIOR = ["--prior-channels", 16, "--prior-layers", 3, "--prior-kernel", 3,
             "--prior-batch-size", 16, "--prior-conditional"]


@pytest.fixture(scope="module")
def ddp_worker(tmp_path_factory):
    """One launch of tests/vq_ddp_worker.py on 2 ranks: the quantiser checks, then 6 steps of
    vq_vae.py's VQ-VAE phase with each codebook kind (run folders run/ and run-loss/)."""
    out = tmp_path_factory.mktemp("vq_ddp")
    torchrun(ROOT / "tests" / "vq_ddp_worker.py", out, "--data-root", out / "data", *DDP_TINY,
             "--max-steps", 6, "--out", out / "run")
    return out


def load_ranks(folder, name, key=None):
    states = [torch.load(folder / f"{name}{r}.pt", weights_only=True) for r in (0, 1)]
    return [s[key] for s in states] if key else states


@pytest.mark.slow
def test_torchrun_ema_update_is_the_update_on_the_joint_batch(ddp_worker):
    """Each rank quantises half a batch; with the counts and sums all-reduced, both ranks make
    the update that one process makes on the whole batch."""
    a, b = load_ranks(ddp_worker, "quantizer", "ema")
    for k in a["after"]:
        assert torch.equal(a["after"][k], b["after"][k]), k
    q = vq.VectorQuantizer(16, 4, "ema", decay=0.9, restart=False)
    q.load_state_dict(a["before"])
    _, _, terms = q(a["joint"])
    for k, v in q.state_dict().items():
        assert not torch.equal(v, a["before"][k]), k
        torch.testing.assert_close(a["after"][k], v, rtol=1e-6, atol=1e-7)
    # the usage terms logged in training describe the joint batch too
    torch.testing.assert_close(a["perplexity"], terms["perplexity"])
    torch.testing.assert_close(a["used"], terms["used"])
    # a rank's half alone gives another update: the reduction is what makes them agree
    alone = vq.VectorQuantizer(16, 4, "ema", decay=0.9, restart=False)
    alone.load_state_dict(a["before"])
    alone(a["joint"][:2])
    assert not torch.allclose(alone.ema_sum, a["after"]["ema_sum"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ema", "loss"])
def test_torchrun_dead_code_restart_takes_rank_0s_vectors_on_every_rank(ddp_worker, kind):
    """15 of 16 codes dead, each rank with its own batch and RNG seed: both ranks re-seed them
    with the same vectors, encoder outputs of rank 0's batch."""
    a, b = load_ranks(ddp_worker, "quantizer", f"restart/{kind}")
    assert torch.equal(a["codebook"], b["codebook"])
    assert torch.equal(a["ema_count"], b["ema_count"])
    assert torch.equal(a["ema_count"][1:], torch.ones(15))      # all 15 were restarted
    rows = [s["batch"].permute(0, 2, 3, 1).reshape(-1, 4) for s in (a, b)]     # (N, D) each
    for e in a["codebook"][1:]:
        assert (rows[0] == e).all(1).any()
        assert not (rows[1] == e).all(1).any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fit", "fit_loss"])
def test_torchrun_training_keeps_weights_and_codebooks_identical_on_all_ranks(ddp_worker, name):
    a, b = load_ranks(ddp_worker, name)
    assert a["step"] == b["step"] == 6
    # the ranks trained on disjoint shards, so unreduced codebook statistics would diverge
    assert a["batches"].shape == b["batches"].shape == (6, 16, 1, 64, 64)
    seen = [s["batches"].flatten(0, 1).flatten(1) for s in (a, b)]              # (96, 4096)
    assert not (seen[0][:, None] == seen[1][None]).all(-1).any()
    for k in a["model"]:                  # parameters, codebook, EMA counts and sums: bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["quantizer.ema_count"], torch.ones(32))
    # the data variance is the whole training set's on every rank
    train = utils.load_dataset("dsprites", ddp_worker / "data", "train", 256)
    assert a["variance"] == b["variance"] == vq.data_variance(train.images, torch.device("cpu"))
    # rank 0's checkpoint holds the plain module's state, the same as every rank's
    saved = checkpoints.load(ddp_worker / ("run" if name == "fit" else "run-loss")
                             / "checkpoint.pt")
    assert saved["step"] == 6 and saved["args"]["codebook"] == ("ema" if name == "fit" else "loss")
    for k in a["model"]:
        assert torch.equal(a["model"][k], saved["model"][k]), k


@pytest.mark.slow
def test_torchrun_script_writes_once_from_rank_0_and_resumes_both_phases(tmp_path, ddp_worker):
    out = tmp_path / "run"
    common = ["--data-root", tmp_path / "data", *DDP_TINY, *DDP_PRIOR, "--out", out]
    torchrun(ROOT / "vq_vae.py", *common, "--max-steps", 4, "--prior-epochs", 1,
             "--prior-max-steps", 2)
    # what one process writes, written once: no second save, no stray temporary file (.lock
    # is the run folder's lock, held by rank 0)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == sorted([
        "checkpoint.pt", "prior.pt", "metrics.json", "history.json", "losses.png",
        "reconstructions.png", "code_usage.png", "samples.png", "prior_losses.png",
        "prior_history.json"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 4 and m["prior"]["steps"] == 2
    # both ranks' shards of the held-out set are scored and added up
    assert m["test"]["images"] == 64 and sum(m["test"]["code_counts"]) == 64 * 16 * 16
    assert m["test"]["recon_error"] == pytest.approx(m["test"]["mse"] / m["data_variance"])
    # the checkpoints rebuild in one process, from their stored args alone
    state = checkpoints.load(out / "checkpoint.pt")
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    vq.build_model(argparse.Namespace(**state["args"]), channels=1).load_state_dict(state["model"])
    prior = checkpoints.load(out / "prior.pt")
    assert prior["step"] == 2 and prior["vq_step"] == 4 and len(prior["rng_ranks"]) == 2
    pp.build_prior(prior["config"]).load_state_dict(prior["model"])

    # the prior resumes under torchrun; the VQ-VAE, already complete, is not trained again
    torchrun(ROOT / "vq_vae.py", *common, "--max-steps", 4, "--prior-epochs", 1,
             "--prior-max-steps", 4, "--resume")
    assert not (out / "checkpoint.prev.pt").exists()
    prior = checkpoints.load(out / "prior.pt")
    assert prior["step"] == 4 and [r["step"] for r in prior["log"]] == [2, 4]
    assert [h["step"] for h in json.loads((out / "prior_history.json").read_text())] == [2, 4]

    # the VQ-VAE resumes under torchrun: steps 4 to 6 give the worker's 6 straight steps
    torchrun(ROOT / "vq_vae.py", *common, "--max-steps", 6, "--prior-epochs", 0, "--resume")
    resumed = checkpoints.load(out / "checkpoint.pt")
    straight = checkpoints.load(ddp_worker / "run" / "checkpoint.pt")
    assert resumed["step"] == straight["step"] == 6
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in straight["log"]]
    for k in straight["model"]:
        assert torch.equal(resumed["model"][k], straight["model"][k]), k
