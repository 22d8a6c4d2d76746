"""beta-VAE objectives and schedules, disentanglement metrics on synthetic codes, end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import beta_vae as bv
import beta_vae_analyze as ba
import disentanglement as dm
import standard_vae as sv
import utils
from training import checkpoints
from training.sizes import C_SHARE, WARMUP_SHARE


# ---- schedules and objectives ------------------------------------------------------------------
def test_capacity_schedule_gives_published_values():
    # Burgess et al. 2018 on dSprites: C rises linearly from 0 to 25 nats over 100,000 steps
    assert bv.capacity(0, 25.0, 100_000) == 0.0
    assert bv.capacity(50_000, 25.0, 100_000) == 12.5
    assert bv.capacity(100_000, 25.0, 100_000) == 25.0
    assert bv.capacity(250_000, 25.0, 100_000) == 25.0
    assert bv.beta_at(0, 4.0, 1000) == 0.0
    assert bv.beta_at(500, 4.0, 1000) == 2.0
    assert bv.beta_at(10**6, 4.0, 1000) == 4.0
    assert bv.beta_at(0, 4.0, 0) == 4.0


def test_defaults_are_the_published_settings():
    # dSprites defaults to the recipe that disentangled best: beta-TCVAE, beta 6, stratified
    # estimate, Adam 1e-3 (Chen et al.), on Burgess et al.'s network at batch 64
    args = bv.check_args(bv.parse_args(["--dataset", "dsprites"]))
    assert (args.objective, args.beta, args.tc_estimator, args.lr, args.batch_size,
            args.arch) == ("TC", 6.0, "mss", 1e-3, 64, "conv")
    assert bv.check_args(bv.parse_args(["--dataset", "dsprites", "--lr", "2e-4"])).lr == 2e-4
    # ... and says why; its MIG curve has a point every 256,000 images, whatever the batch
    assert "disentangled best" in bv.resolve_schedule(args, 31_104)[0]
    assert args.eval_every == 4_000
    assert bv.check_args(bv.parse_args(["--dataset", "dsprites", "--batch-size", "512"])
                         ).eval_every == 500
    assert bv.check_args(bv.parse_args(["--dataset", "dsprites", "--eval-every", "7"])
                         ).eval_every == 7
    assert bv.check_args(bv.parse_args(["--dataset", "dsprites", "--mig-points", "0"])
                         ).eval_every is None
    # objective B: Burgess et al.'s published settings
    args = bv.check_args(bv.parse_args(["--dataset", "dsprites", "--objective", "B"]))
    bv.resolve_schedule(args, 300_000)                  # a published-length run
    assert (args.objective, args.gamma, args.c_max, args.c_steps) == ("B", 1000.0, 25.0, 100_000)
    assert (args.lr, args.batch_size, args.latent) == (5e-4, 64, 10)
    model = bv.build_model(args, 1, 64)
    convs = [m for m in model.encoder.convs if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 4
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    fcs = [m for m in model.encoder.fc if isinstance(m, torch.nn.Linear)]
    assert [f.out_features for f in fcs] == [256, 256, 20]
    # CelebA serves attribute vectors: objective H with beta 1 unless told otherwise, and said
    celeba = bv.check_args(bv.parse_args([]))
    assert (celeba.dataset, celeba.objective, celeba.beta) == ("celeba", "H", 1.0)
    assert bv.resolve_schedule(celeba, 1110)[0].startswith("objective H with beta 1: the default")
    for flags, expected in ((["--objective", "B"], ("B", 4.0, 5e-4)),
                            (["--beta", "2"], ("H", 2.0, 5e-4)),
                            (["--objective", "H"], ("H", 4.0, 5e-4)),
                            (["--objective", "TC"], ("TC", 6.0, 1e-3))):
        args = bv.check_args(bv.parse_args(flags))
        assert (args.objective, args.beta, args.lr) == expected, flags
        assert not bv.resolve_schedule(args, 1110)[0].startswith("objective")


def settings(args):
    """beta_vae_loss's keyword arguments from parsed flags, as beta_vae.main passes them."""
    return {k: getattr(args, k) for k in bv.LOSS_FLAGS}


def test_objectives_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.3), generator=g)
    logits, mu, logvar = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 3, generator=g), \
        torch.randn(4, 3, generator=g)
    recon = -sv.log_likelihood(x, logits, "bce").mean()
    kl = sv.gaussian_kl(mu, logvar).sum(1).mean()
    args = bv.check_args(bv.parse_args(["--objective", "B", "--c-max", "20", "--c-steps", "100"]))
    terms = bv.beta_vae_loss(x, logits, mu, logvar, 30, **settings(args))
    torch.testing.assert_close(terms["loss"], recon + 1000 * (kl - 6.0).abs())
    assert terms["capacity"] == pytest.approx(6.0)
    args = bv.check_args(bv.parse_args(["--objective", "H", "--beta", "4", "--beta-warmup", "10"]))
    terms_h = bv.beta_vae_loss(x, logits, mu, logvar, 5, **settings(args))
    torch.testing.assert_close(terms_h["loss"], recon + 2.0 * kl)
    torch.testing.assert_close(terms["kl_dims"].sum(), kl)


def test_traversal_rows_sweep_one_latent_each():
    torch.manual_seed(0)
    model = sv.VAE(1, 28, 4, [8, 8], hidden=16).eval()
    x = torch.rand(2, 1, 28, 28)
    grid = bv.latent_traversal(model, x, [2, 0], span=2.0, steps=3)
    assert grid.shape == (2, 6, 1, 28, 28)
    with torch.no_grad():
        mu = model.encoder(x)[0]
        z = mu[1].clone()
        z[0] = 2.0                                   # row 1 sweeps z0; seed 1, last step (+2)
        expected = torch.sigmoid(model.decoder(z[None]))[0]
    torch.testing.assert_close(grid[1, 5], expected)


def test_traversal_png_keeps_the_most_informative_rows(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    model = sv.VAE(1, 28, 4, [8, 8], hidden=16).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    kl = [0.1, 3.0, 0.2, 2.0]
    assert bv.save_traversal(model, images, kl, tmp_path / "all.png") == [1, 3, 2, 0]
    assert bv.save_traversal(model, images, kl, tmp_path / "two.png", rows=2) == [1, 3]
    tall, short = (Image.open(tmp_path / n).size for n in ("all.png", "two.png"))
    assert tall[0] == short[0]
    assert (tall[1], short[1]) == (4 * (28 + 2) + 2, 2 * (28 + 2) + 2)      # rows of 28 px + pad


# ---- metrics on synthetic codes ----------------------------------------------------------------
SIZES = (3, 6, 10, 16, 16)


def sample_factors(n, rng, sizes=SIZES):
    return np.stack([rng.integers(s, size=n) for s in sizes], 1)


def normalised(f, sizes=SIZES):
    return 2 * f / (np.array(sizes) - 1) - 1


def test_mutual_information_matches_a_hand_computation():
    a = np.array([0, 0, 1, 1])
    assert dm.mutual_information(a, a) == pytest.approx(np.log(2))
    assert dm.mutual_information(a, np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    # joint 1/2 on (0,0), 1/4 on (1,0), 1/4 on (1,1)
    i = 0.5 * np.log(0.5 / (0.5 * 0.75)) + 0.25 * np.log(0.25 / (0.5 * 0.75)) \
        + 0.25 * np.log(0.25 / (0.5 * 0.25))
    assert dm.mutual_information(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == \
        pytest.approx(i)


def test_mig_is_one_for_a_perfect_code_and_zero_for_shared_or_noise():
    rng = np.random.default_rng(0)
    f = sample_factors(10_000, rng)
    perfect = dm.mig(normalised(f), f)[0]
    shared = dm.mig(np.repeat(normalised(f), 2, axis=1), f)[0]      # each factor in two latents
    noise = dm.mig(rng.normal(size=(10_000, 5)), f)[0]
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
    mixed = dm.mig(normalised(f) @ (0.6 * np.eye(5) + 0.4 * q), f)[0]
    assert perfect > 0.99
    assert shared == pytest.approx(0.0, abs=1e-9) and noise < 0.01
    assert 0.05 < mixed < 0.9


def test_latents_are_named_by_the_factors_they_encode():
    names = ["shape", "scale", "posX"]
    entropy = np.array([1.0, 2.0, 4.0])
    mi = np.array([[0.9, 0.1, 0.2],        # shape alone
                   [0.0, 0.2, 2.0],        # posX (its share 0.5 beats scale's 0.1)
                   [0.0, 1.0, 1.6],        # posX 0.4 and scale 0.5: mixed, largest first
                   [0.05, 0.1, 0.1]])      # nothing above the floor
    assert dm.latent_factors(mi, entropy, names) == ["shape", "posX", "scale+posX", ""]


def test_factor_vae_score_is_one_axis_aligned_and_low_rotated():
    rng = np.random.default_rng(0)
    sizes = SIZES[1:]                                  # four factors
    sample = lambda n, rng: sample_factors(n, rng, sizes)
    aligned = lambda f: normalised(f, sizes) + 0.01 * rng.normal(size=f.shape)
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    rotated = lambda f: normalised(f, sizes) @ hadamard           # every latent mixes all
    score, train_acc, active = dm.factor_vae_score(aligned, sample, rng, 1000, 500,
                                                   n_global=5000)
    assert score == 1.0 and train_acc == 1.0 and active.all()
    assert dm.factor_vae_score(rotated, sample, rng, 1000, 500, n_global=5000)[0] < 0.45
    # a latent with std < 0.05 is dropped; with none left the score is 0
    dead = lambda f: 0.01 * normalised(f, sizes)
    assert dm.factor_vae_score(dead, sample, rng, 10, 10, n_global=500)[0] == 0.0


def test_schedules_follow_the_run_length_unless_given():
    # not given: C reaches C_max at C_SHARE of the run, capped at the published 100,000 steps
    args = bv.check_args(bv.parse_args(["--dataset", "celeba", "--objective", "B"]))
    lines = bv.resolve_schedule(args, 1110)
    assert args.c_steps == round(C_SHARE * 1110) and args.c_max == 50.0
    assert bv.capacity(1110, args.c_max, args.c_steps) == 50.0
    assert lines[0].startswith(f"schedule: C rises linearly from 0 to 50 nats over "
                               f"{args.c_steps:,} steps") and len(lines) == 1
    args = bv.check_args(bv.parse_args(["--dataset", "celeba", "--objective", "B"]))
    bv.resolve_schedule(args, 10**6)
    assert args.c_steps == 100_000
    # given and too long for the run: a warning with the numbers
    args = bv.check_args(bv.parse_args(["--dataset", "celeba", "--objective", "B",
                                        "--c-steps", "100000"]))
    lines = bv.resolve_schedule(args, 1110)
    assert args.c_steps == 100_000
    assert lines[1].startswith("warning: C will reach only 0.56 of its 50 nats (1%) in 1,110 "
                               "steps")
    # H and TC warm beta up over WARMUP_SHARE of the run; TC's beta defaults to 6
    args = bv.check_args(bv.parse_args(["--objective", "TC"]))
    assert "total correlation" in bv.resolve_schedule(args, 2000)[0]
    assert (args.beta, args.beta_warmup) == (6.0, round(WARMUP_SHARE * 2000))
    args = bv.check_args(bv.parse_args(["--objective", "H", "--beta-warmup", "5000"]))
    assert args.beta == 4.0 and bv.resolve_schedule(args, 1000)[1].startswith(
        "warning: beta will reach 0.20 of 4")


# ---- beta-TCVAE: the KL decomposition against brute force --------------------------------------
def brute_force_decomposition(z, mu, logvar, weights):
    """MI, TC and dimension-wise KL per sample with q(z_i) = sum_j weights[i][j] q(z_i|x_j),
    written as explicit loops over torch.distributions densities."""
    from torch.distributions import Normal
    B, D = z.shape
    mi, tc, dim_kl = [], [], []
    for i in range(B):
        q = [Normal(mu[j], torch.exp(0.5 * logvar[j])) for j in range(B)]
        log_own = q[i].log_prob(z[i]).sum()
        qz = sum(weights[i][j] * q[j].log_prob(z[i]).sum().exp() for j in range(B))
        qzd = [sum(weights[i][j] * q[j].log_prob(z[i])[d].exp() for j in range(B))
               for d in range(D)]
        log_marginals = sum(torch.log(v) for v in qzd)
        log_p = Normal(0.0, 1.0).log_prob(z[i]).sum()
        mi.append(log_own - torch.log(qz))
        tc.append(torch.log(qz) - log_marginals)
        dim_kl.append(log_marginals - log_p)
    return [torch.stack(t).mean() for t in (mi, tc, dim_kl)]


@pytest.mark.parametrize("estimator,data_size", [("mss", 5), ("mss", 1000), ("mws", 1000)])
def test_tc_decomposition_matches_brute_force(estimator, data_size):
    g = torch.Generator().manual_seed(0)
    B, D = 5, 3
    mu = torch.randn(B, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(B, D, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(B, D, generator=g, dtype=torch.float64)
    n = data_size
    if estimator == "mws":
        weights = [[1 / (n * B)] * B for _ in range(B)]
    else:   # own density 1/N, every other image (N-1)/(N(B-1)); with N = B: the exact 1/N
        weights = [[1 / n if i == j else (n - 1) / (n * (B - 1)) for j in range(B)]
                   for i in range(B)]
    terms = bv.tc_decomposition(z, mu, logvar, data_size, estimator)
    expected = brute_force_decomposition(z, mu, logvar, weights)
    for name, value in zip(("mi", "tc", "dim_kl"), expected):
        torch.testing.assert_close(terms[name].double(), value.double(), rtol=1e-4, atol=1e-4)
    # the three parts add up to the sampled KL, log q(z|x) - log p(z)
    from torch.distributions import Normal
    sampled_kl = (Normal(mu, torch.exp(0.5 * logvar)).log_prob(z)
                  - Normal(0.0, 1.0).log_prob(z)).sum(1).mean()
    torch.testing.assert_close(sum(terms.values()).double(), sampled_kl, rtol=1e-4, atol=1e-4)


def test_stratified_estimate_of_q_z_is_unbiased():
    """Averaged over every batch that holds image n* and B-1 of the other N-1, the stratified
    estimate of q(z) equals the exact q(z) = sum_n q(z|n) / N."""
    from itertools import combinations
    from torch.distributions import Normal
    g = torch.Generator().manual_seed(1)
    N, B, D = 6, 3, 2
    mu = torch.randn(N, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.3
    z = mu[0] + 0.5 * torch.randn(D, generator=g, dtype=torch.float64)   # a sample of image 0
    density = lambda n: Normal(mu[n], torch.exp(0.5 * logvar[n])).log_prob(z).sum().exp()
    exact = sum(density(n) for n in range(N)) / N
    log_w = bv.aggregate_log_weights(B, N, "mss")[0].double()          # row of image 0
    estimates = [torch.logsumexp(log_w + torch.stack([density(n).log() for n in (0, *others)]),
                                 0).exp() for others in combinations(range(1, N), B - 1)]
    torch.testing.assert_close(torch.stack(estimates).mean(), exact)
    assert torch.stack(estimates).std() > 0          # single batches do differ


def test_mws_is_chen_et_als_minibatch_weighted_formula_constants_included():
    """Chen et al. 2018, minibatch-weighted sampling (their eq. for E_q(z)[log q(z)]): with a
    batch of M images from N, log q(z_i) ~ log sum_j q(z_i|n_j) - log(N M), and the same for
    each marginal q(z_id). Written here in that form, loop by loop, constants included."""
    from torch.distributions import Normal
    g = torch.Generator().manual_seed(2)
    M, D, N = 4, 3, 737_280
    mu = torch.randn(M, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(M, D, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(M, D, generator=g, dtype=torch.float64)
    mi, tc, dim_kl = [], [], []
    for i in range(M):
        per_dim = torch.stack([Normal(mu[j], torch.exp(0.5 * logvar[j])).log_prob(z[i])
                               for j in range(M)])                       # (M, D): z_i | n_j
        log_qz = torch.logsumexp(per_dim.sum(1), 0) - math.log(N * M)
        log_qzd = torch.logsumexp(per_dim, 0) - math.log(N * M)          # (D,)
        log_own = per_dim[i].sum()
        log_pz = Normal(0.0, 1.0).log_prob(z[i]).sum()
        mi.append(log_own - log_qz)
        tc.append(log_qz - log_qzd.sum())
        dim_kl.append(log_qzd.sum() - log_pz)
    terms = bv.tc_decomposition(z, mu, logvar, N, "mws")
    for name, values in (("mi", mi), ("tc", tc), ("dim_kl", dim_kl)):
        torch.testing.assert_close(terms[name].double(), torch.stack(values).mean(),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_constant_terms_of_the_estimators_carry_no_gradient(estimator, monkeypatch):
    """A constant c added to every log weight (mws's -log(N B), the -log N that mss's weights
    share) moves MI by -c, TC by -(D - 1) c and dimension-wise KL by +D c: their sum, and every
    gradient, stay the same. So a dimension-wise KL near -D log N under mws (each marginal's
    batch terms equal, log B - log(N B) = -log N per latent) is this offset, not a signal."""
    g = torch.Generator().manual_seed(3)
    B, D, N, c = 6, 4, 1000, 7.5
    mu = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (torch.randn(B, D, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)

    def terms_and_grads():
        z = mu + torch.exp(0.5 * logvar) * eps
        terms = bv.tc_decomposition(z, mu, logvar, N, estimator)
        grads = {k: torch.autograd.grad(v, (mu, logvar), retain_graph=True)
                 for k, v in terms.items()}
        return {k: v.detach() for k, v in terms.items()}, grads

    base, base_grads = terms_and_grads()
    weights = bv.aggregate_log_weights
    monkeypatch.setattr(bv, "aggregate_log_weights", lambda *a, **k: weights(*a, **k) + c)
    shifted, shifted_grads = terms_and_grads()
    for name, moved in (("mi", -c), ("tc", -(D - 1) * c), ("dim_kl", D * c)):  # fp32 terms
        assert (shifted[name] - base[name]).item() == pytest.approx(moved, abs=1e-4)
        for a, b in zip(base_grads[name], shifted_grads[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tc_objective_is_the_elbo_when_beta_is_one():
    """recon + MI + beta*TC + dim-KL: at beta = 1 it is recon + log q(z|x) - log p(z), the ELBO
    with a sampled KL; the TC term alone carries beta."""
    from torch.distributions import Normal
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3), generator=g)
    logits, mu, logvar = (torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, generator=g),
                          torch.randn(6, 3, generator=g))
    recon = -sv.log_likelihood(x, logits, "bce").mean()
    losses = {}
    for beta in (1.0, 5.0):
        args = bv.check_args(bv.parse_args(["--objective", "TC", "--beta", str(beta),
                                            "--beta-warmup", "0"]))
        torch.manual_seed(7)
        losses[beta] = bv.beta_vae_loss(x, logits, mu, logvar, 10, **settings(args),
                                        data_size=100)
    torch.manual_seed(7)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)                # the loss's sample
    sampled_kl = (Normal(mu, torch.exp(0.5 * logvar)).log_prob(z)
                  - Normal(0.0, 1.0).log_prob(z)).sum(1).mean()
    torch.testing.assert_close(losses[1.0]["loss"], recon + sampled_kl)
    torch.testing.assert_close(losses[5.0]["loss"] - losses[1.0]["loss"], 4 * losses[1.0]["tc"])


def test_metric_codes_encode_each_distinct_image_once(tmp_path):
    """The code table returns exactly what encoding the drawn images returns, and images drawn
    again are looked up, not encoded again."""
    torch.manual_seed(0)
    model = sv.VAE(1, 64, 3, [8] * 4, hidden=16).eval()
    represent = dm.dsprites_encoder(model, tmp_path, "cpu", chunk=64)
    rng = np.random.default_rng(0)
    first = dm.sample_dsprites_factors(100, rng)
    again = np.concatenate([first[:40], dm.sample_dsprites_factors(60, rng), first[:40]])
    codes_first, codes_again = represent(first), represent(again)
    distinct = lambda f: len(np.unique(f @ np.array(utils.DSPRITES_STRIDES[1:]), axis=0))
    assert represent.encoded == distinct(np.concatenate([first, again]))
    classes = np.zeros((len(again), 6), np.int64)
    classes[:, 1:] = again
    index = torch.from_numpy(classes @ np.array(utils.DSPRITES_STRIDES))
    with torch.no_grad():
        direct = model.encoder(utils.dsprites_images(tmp_path, index).float() / 255)[0].numpy()
    np.testing.assert_allclose(codes_again, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(codes_again[:40], codes_first[:40])


# ---- end to end --------------------------------------------------------------------------------
def test_beta_vae_trains_resumes_exactly_and_is_analysed(tmp_path, cli):
    common = ["--dataset", "dsprites", "--data-root", tmp_path / "data", "--limit", 256,
              "--batch-size", 32, "--eval-limit", 64, "--log-every", 2, "--device", "cpu",
              "--precision", "fp32", "--objective", "B", "--c-steps", 100, "--latent", 4]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("beta_vae.py", *common, "--max-steps", 12, "--out", straight)
    cli("beta_vae.py", *common, "--max-steps", 6, "--out", split)
    cli("beta_vae.py", *common, "--max-steps", 12, "--out", split, "--resume")
    for name in ("checkpoint.pt", "metrics.json", "history.json", "reconstructions.png",
                 "samples.png", "losses.png", "kl_per_dim.png", "traversal.png"):
        assert (straight / name).stat().st_size > 0, name
    m = json.loads((split / "metrics.json").read_text())
    assert m["steps"] == 12 and m["capacity"] == pytest.approx(bv.capacity(12, 25.0, 100))
    a = checkpoints.load(straight / "checkpoint.pt")
    b = checkpoints.load(split / "checkpoint.pt")
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    assert len(a["log"][0]["kl_dims"]) == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    proc = cli("beta_vae_analyze.py", "--checkpoint", straight / "checkpoint.pt",
                  "--traverse", "--gif", "--metrics", "--points", 300, "--train-votes", 40,
                  "--eval-votes", 20, "--out", tmp_path / "analysis")
    assert "MIG" in proc.stdout
    result = json.loads((tmp_path / "analysis" / "disentanglement.json").read_text())
    assert 0 <= result["mig"] <= 1 and 0 <= result["factor_vae"] <= 1
    assert set(result["mutual_information"]["z0"]) == {"shape", "scale", "orientation",
                                                       "posX", "posY"}
    assert set(result["latent_factors"]) == {"z0", "z1", "z2", "z3"}
    assert (tmp_path / "analysis" / "traversal.png").stat().st_size > 0
    # the GIF: one frame per traversal step, there and back; frames differ as the latent moves
    with Image.open(tmp_path / "analysis" / "traversal.gif") as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
    assert len(frames) == 2 * 7 - 2
    assert np.array_equal(frames[1], frames[-1]) and np.abs(frames[0] - frames[6]).max() > 0

    # --latent-kl: the held-out KL per latent of each run, recomputed here, and identical runs
    # (straight and split are bit-identical) give identical columns
    cli("beta_vae_analyze.py", "--checkpoint", straight / "checkpoint.pt", "--latent-kl",
        split / "checkpoint.pt", "--out", tmp_path / "compare", "--precision", "fp32")
    compare = json.loads((tmp_path / "compare" / "latent_kl.json").read_text())
    first, second = compare["runs"]
    model, train_args, _ = ba.load_model(straight / "checkpoint.pt", "cpu")
    _, held_out = ba.evaluate_held_out(model, train_args, tmp_path / "data", "cpu")
    assert first["kl_per_dim"] == pytest.approx(held_out["kl_per_dim"])
    assert first["kl_per_dim"] == second["kl_per_dim"] and first["latent"] == 4
    kl = first["kl_per_dim"]
    assert [kl[d] for d in first["latents_by_kl"]] == sorted(kl, reverse=True)
    assert first["latents_above_threshold"] == sum(k > 0.5 for k in kl)
    assert first["active_units"] == held_out["active_units"]
    assert (tmp_path / "compare" / "latent_kl.png").stat().st_size > 0


def test_kl_plot_names_informative_latents_and_groups_the_rest():
    """With 32 latents the KL plot labels only those above the threshold (largest first) and
    puts the quiet ones under one legend entry."""
    steps, dims = [100, 200], 32
    final = [0.01] * dims
    final[5], final[2], final[7] = 9.0, 4.0, 0.6
    log = [{"step": s, "kl": sum(final) * s / 200, "kl_dims": [k * s / 200 for k in final]}
           for s in steps]
    args = bv.check_args(bv.parse_args(["--dataset", "dsprites", "--latent", str(dims),
                                        "--objective", "B", "--c-steps", "1000"]))
    fig, axes = utils.plot_figure()
    bv.plot_kl_per_dim(log, None, args, informative=0.5, ax=axes[0, 0])
    _, labels = axes[0, 0].get_legend_handles_labels()
    assert labels == ["z5", "z2", "z7", "29 latents < 0.5 nat", "total KL", "capacity C"]
    assert len(axes[0, 0].lines) == dims + 2
    utils.save_figure(fig, os.devnull)


def test_analysis_refuses_a_damaged_checkpoint(tmp_path, cli):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = cli("beta_vae_analyze.py", "--checkpoint", bad, "--traverse", check=False)
    assert proc.returncode == 1 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_fresh_encoder_output_depends_on_the_image(tmp_path):
    """Regression: with PyTorch's default init the Burgess encoder's posterior means varied by
    ~3e-4 across dSprites images, and under gamma*|KL - C| training collapsed to a constant code
    (recon stuck at the mean image). He init keeps the means image-dependent from step 0."""
    args = bv.check_args(bv.parse_args(["--dataset", "dsprites"]))
    torch.manual_seed(0)
    model = bv.build_model(args, 1, 64)
    x = utils.load_dataset("dsprites", tmp_path, "test", 64).images.float() / 255
    with torch.no_grad():
        mu, _ = model.encoder(x)
    assert mu.std(0).mean() > 0.05


def test_traverse_alone_names_rows_from_the_same_checkpoints_earlier_metrics(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    found = tmp_path / "disentanglement.json"
    found.write_text(json.dumps({"checkpoint": str(ckpt), "step": 300,
                                 "latent_factors": {"z0": "posX", "z1": ""}}))
    assert ba.earlier_metrics(found, ckpt, 300)["latent_factors"]["z0"] == "posX"
    assert ba.earlier_metrics(found, ckpt, 600) == {}                 # trained on since
    assert ba.earlier_metrics(found, tmp_path / "other.pt", 300) == {}
    assert ba.earlier_metrics(tmp_path / "absent.json", ckpt, 300) == {}
    found.write_text("{not json")
    assert ba.earlier_metrics(found, ckpt, 300) == {}


def test_a_short_celeba_run_says_attribute_vectors_need_more_steps():
    args = bv.check_args(bv.parse_args(["--dataset", "celeba"]))              # 30 epochs
    said = " ".join(bv.resolve_schedule(args, 1110))
    assert "note: 1,110 steps are few for attribute vectors" in said
    assert "(--epochs 109)" in said                     # 109 epochs of 37 steps: 4,033 steps
    args = bv.check_args(bv.parse_args(["--dataset", "celeba", "--max-steps", "500"]))
    assert "(--max-steps 4000)" in " ".join(bv.resolve_schedule(args, 500))
    for argv, total in ((["--dataset", "celeba"], 76_000), (["--dataset", "dsprites"], 100),
                        (["--dataset", "celeba", "--objective", "B"], 1110)):
        args = bv.check_args(bv.parse_args(argv))
        assert not any(line.startswith("note") for line in bv.resolve_schedule(args, total))


# ---- the beta-VAE paper's fully connected network (--arch mlp) ---------------------------------
def test_mlp_is_the_papers_dsprites_network():
    """Higgins et al. 2017: encoder 4096-1200-1200-2z with ReLU, decoder z-1200-1200-1200-4096
    with tanh and Bernoulli logits out."""
    args = bv.check_args(bv.parse_args(["--dataset", "dsprites", "--arch", "mlp"]))
    model = bv.build_model(args, 1, 64)
    linear = lambda net: [(m.in_features, m.out_features) for m in net if
                          isinstance(m, torch.nn.Linear)]
    assert linear(model.encoder.net) == [(4096, 1200), (1200, 1200), (1200, 20)]
    assert linear(model.decoder.net) == [(10, 1200), (1200, 1200), (1200, 1200), (1200, 4096)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.encoder.net) == 2
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.decoder.net) == 3
    x = torch.rand(3, 1, 64, 64)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (3, 10)
    assert bv.check_args(bv.parse_args(["--dataset", "dsprites"])).hidden == 256   # conv's FC


def test_mlp_trains_resumes_exactly_and_is_rebuilt_by_the_analysis(tmp_path):
    """--arch mlp through the real loop, in process: 12 steps straight equal 6 + 6 resumed,
    the MIG curve is written at every evaluation (--eval-every), and the analysis script
    rebuilds the MLP from the checkpoint alone."""
    common = ["--dataset", "dsprites", "--data-root", str(tmp_path / "data"), "--limit", "256",
              "--batch-size", "32", "--eval-limit", "64", "--log-every", "2", "--device", "cpu",
              "--arch", "mlp", "--hidden", "32", "--latent", "4", "--objective", "TC",
              "--tc-estimator", "mws", "--eval-every", "4", "--mig-points", "200",
              "--precision", "fp32"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    metrics = bv.main(bv.parse_args([*common, "--max-steps", "12", "--out", str(straight)]))
    bv.main(bv.parse_args([*common, "--max-steps", "6", "--out", str(split)]))
    bv.main(bv.parse_args([*common, "--max-steps", "12", "--out", str(split), "--resume"]))
    assert metrics["args"]["arch"] == "mlp" and metrics["precision"]["bf16"] is False
    a, b = (checkpoints.load(p / "checkpoint.pt") for p in (straight, split))
    assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    history = json.loads((straight / "history.json").read_text())
    assert [h["step"] for h in history] == [4, 8, 12]        # every 4 steps; 8 ends epoch 1
    assert all(0 <= h["mig"] <= 1 and len(h["latent_factors"]) == 4 for h in history)
    model, train_args, _ = ba.load_model(straight / "checkpoint.pt", "cpu")
    assert isinstance(model.encoder, sv.MLPEncoder) and train_args.hidden == 32

    # --curves: MIG against images seen, from the finished run and from a run whose
    # metrics.json is not written yet (read from its checkpoint)
    (split / "metrics.json").unlink()
    summary = ba.main(ba.parse_args(["--curves", str(straight), str(split), "--out",
                                     str(tmp_path / "curves")]))
    assert [r["images_seen"] for r in summary] == [[128, 256, 384], [128, 192, 256, 384]]
    assert summary[0]["mig"] == [h["mig"] for h in history]     # the split run also scored
    assert summary[1]["mig"][:1] + summary[1]["mig"][2:] == summary[0]["mig"]  # its stop, 6
    assert summary[0]["recipe"] == "TC mws, mlp, batch 32, lr 0.001, seed 0"   # TC's default
    assert summary[0]["finished"] and not summary[1]["finished"]
    assert summary[1]["images_per_s"] > 0         # the unfinished run's speed, from its history
    assert (tmp_path / "curves" / "mig_curves.png").stat().st_size > 0
    with pytest.raises(utils.UserError, match="no readable history.json"):
        ba.mig_curves([tmp_path], tmp_path)
    # an earlier mig_curves.json stands for runs whose folders are gone; seeds share a setting
    (tmp_path / "b").mkdir()
    again = ba.mig_curves([tmp_path / "curves" / "mig_curves.json", straight], tmp_path / "b")
    assert again[:2] == json.loads((tmp_path / "curves" / "mig_curves.json").read_text())["runs"]
    assert again[2]["mig"] == summary[0]["mig"]
    assert {ba.setting(r) for r in again} == {"TC mws, mlp, batch 32, lr 0.001"}
    with pytest.raises(utils.UserError, match="not a mig_curves.json"):
        ba.mig_curves([tmp_path / "straight" / "metrics.json"], tmp_path)


def test_mig_curve_point_is_the_protocols_mig_on_fewer_points(tmp_path):
    """mig_only, the curve's point, equals mig on the same draws of the protocol."""
    torch.manual_seed(0)
    model = sv.VAE(1, 64, 3, [8] * 4, hidden=16).eval()
    point = dm.mig_only(model, tmp_path, "cpu", seed=5, n_points=300)
    factors = dm.sample_dsprites_factors(300, np.random.default_rng(5))
    codes = dm.dsprites_encoder(model, tmp_path, "cpu")(factors)
    assert point["mig"] == pytest.approx(dm.mig(codes, factors)[0])
    assert len(point["latent_factors"]) == 3


def test_metrics_encode_in_fp32_inside_the_analysis_bf16_region(tmp_path):
    """The analysis runs its networks in bf16 autocast where chosen; the metrics' encoder pass
    (MIG, FactorVAE, the curve's point) still sees fp32, as disentanglement_lib scores fp32
    posterior means: the same codes as outside autocast."""
    torch.manual_seed(0)
    model = sv.VAE(1, 64, 3, [8] * 4, hidden=16).eval()
    seen = []                                     # the dtype of the first layer's activations
    first = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, inputs, out: seen.append(out.dtype))
    factors = dm.sample_dsprites_factors(200, np.random.default_rng(1))
    plain = dm.dsprites_encoder(model, tmp_path, "cpu")(factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):          # as beta_vae_analyze.main
        with torch.no_grad():
            model.encoder(torch.rand(2, 1, 64, 64))               # bf16 here, as the probe
        inside = dm.dsprites_encoder(model, tmp_path, "cpu")(factors)
        point = dm.mig_only(model, tmp_path, "cpu", seed=1, n_points=200)
    assert seen[0] == torch.float32 and seen[1] == torch.bfloat16
    assert all(d == torch.float32 for d in seen[2:])
    np.testing.assert_array_equal(inside, plain)
    assert point["mig"] == pytest.approx(dm.mig(plain, factors)[0])
