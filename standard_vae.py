"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

A convolutional encoder q(z|x) = N(mu(x), diag sigma^2(x)) and decoder p(x|z) (Bernoulli or
Gaussian) are trained by maximising the evidence lower bound

    log p(x) >= ELBO = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

with the reparameterisation z = mu + sigma * eps. Held-out data are scored with the ELBO and
with the importance-weighted bound of Burda et al. 2016, which tightens towards log p(x).

    python standard_vae.py --dataset dsprites --epochs 1 --limit 50000
"""
import argparse
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

LOG_2PI = math.log(2 * math.pi)
ARCHS = ("conv", "mlp")
HIDDEN = {"conv": 256, "mlp": 1200}        # FC units: Burgess et al. 2018; Higgins et al. 2017


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def feature_size(image_size):
    """Spatial size after the stride-2 convolutions: halve while even and above 7 (64->4, 28->7)."""
    size = image_size
    while size % 2 == 0 and size > 7:
        size //= 2
    if size > 7 or image_size // size < 4:
        raise utils.UserError(f"unsupported image size {image_size}: use 28, 32 or 64 "
                              "(any size that halves at least twice down to 7 or less)")
    return size


def default_widths(image_size, width=32):
    """Channel widths, one per stride-2 layer: `width` for the first half, doubled after."""
    n = int(math.log2(image_size // feature_size(image_size)))
    return [width * (1 if i < n // 2 else 2) for i in range(n)]


def he_init(module):
    """He et al. 2015 (Kaiming normal) weights and zero biases for a ReLU network.

    PyTorch's default init shrinks activations layer by layer, so a fresh encoder's output barely
    depends on the image; under the strong KL pressure of beta-VAE (gamma*|KL - C| with C near 0)
    it then collapses for good (measured: constant posterior means, recon stuck at the mean
    image). He init keeps the signal and the encoder learns."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """x (B, C, S, S) -> mu, logvar (B, latent): 4x4 stride-2 convolutions, then two FC layers."""

    def __init__(self, channels, image_size, latent, widths, hidden=256):
        super().__init__()
        s = feature_size(image_size)
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            c = w
        self.convs = nn.Sequential(*layers)                       # (B, widths[-1], s, s)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(c * s * s, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * latent))                          # (B, 2 * latent)
        he_init(self)

    def forward(self, x):
        mu, logvar = self.fc(self.convs(x)).float().chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z (B, latent) -> logits (B, C, S, S): the encoder mirrored with transposed convolutions."""

    def __init__(self, channels, image_size, latent, widths, hidden=256):
        super().__init__()
        s = feature_size(image_size)
        self.fc = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, widths[-1] * s * s), nn.ReLU(inplace=True),
            nn.Unflatten(1, (widths[-1], s, s)))                   # (B, widths[-1], s, s)
        layers = []
        for w_in, w_out in zip(widths[::-1], widths[-2::-1] + [channels]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1),
                       nn.ReLU(inplace=True)]
        self.deconvs = nn.Sequential(*layers[:-1])                 # (B, C, S, S) logits
        he_init(self)

    def forward(self, z):
        return self.deconvs(self.fc(z))


class MLPEncoder(nn.Module):
    """x (B, C, S, S) -> mu, logvar (B, latent): fully connected, C*S*S-hidden-hidden-2*latent
    with ReLU; the dSprites network of Higgins et al. 2017 (4096-1200-1200-2z), also used by
    Chen et al. 2018 for beta-TCVAE."""

    def __init__(self, channels, image_size, latent, hidden=1200):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * image_size ** 2, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 2 * latent))                          # (B, 2 * latent)
        he_init(self)

    def forward(self, x):
        mu, logvar = self.net(x).float().chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z (B, latent) -> logits (B, C, S, S): latent-hidden-hidden-hidden-C*S*S with tanh, as in
    Higgins et al. 2017 (z-1200-1200-1200-4096 on dSprites). PyTorch's default init, which
    keeps tanh units out of saturation."""

    def __init__(self, channels, image_size, latent, hidden=1200):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, channels * image_size ** 2),
            nn.Unflatten(1, (channels, image_size, image_size)))     # (B, C, S, S) logits

    def forward(self, z):
        return self.net(z)


class VAE(nn.Module):
    """`arch` "conv": Encoder/Decoder with the conv `widths`; "mlp": MLPEncoder/MLPDecoder."""

    def __init__(self, channels, image_size, latent, widths, hidden=256, recon="bce",
                 sigma="learned", arch="conv"):
        super().__init__()
        if arch == "mlp":
            self.encoder = MLPEncoder(channels, image_size, latent, hidden)
            self.decoder = MLPDecoder(channels, image_size, latent, hidden)
        else:
            self.encoder = Encoder(channels, image_size, latent, widths, hidden)
            self.decoder = Decoder(channels, image_size, latent, widths, hidden)
        self.recon, self.latent = recon, latent
        # Gaussian decoder: one standard deviation shared by all pixels, fixed or learned.
        # Learning it makes the reconstruction/KL balance a maximum-likelihood choice
        # (Rybkin et al. 2021, "Simple and Effective VAE Training with Calibrated Decoders").
        log_sigma = torch.tensor(0.0 if sigma == "learned" else math.log(float(sigma)))
        if recon == "mse" and sigma == "learned":
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def forward(self, x, eps=None):
        mu, logvar = self.encoder(x)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + torch.exp(0.5 * logvar) * eps                      # reparameterisation
        return self.decoder(z), mu, logvar

    def mean_image(self, logits):
        """E[x|z] in [0, 1]: the Bernoulli probabilities or the Gaussian mean."""
        return torch.sigmoid(logits.float())


# ----------------------------------------------------------------------------------------------
# Loss: every term summed over an image's pixels or latents, then averaged over the batch (nats)
# ----------------------------------------------------------------------------------------------
def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension = 0.5 (mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)


def log_likelihood(x, logits, recon, log_sigma=None):
    """log p(x|z) per image (B,): Bernoulli with logits, or Gaussian N(sigmoid(logits), sigma^2)."""
    logits = logits.float()
    if recon == "bce":
        ll = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        ll = (-0.5 * ((x - torch.sigmoid(logits)) * torch.exp(-log_sigma)) ** 2
              - log_sigma - 0.5 * LOG_2PI)
    return ll.flatten(1).sum(1)


def kl_weight(step, warmup):
    """Linear KL warm-up (Bowman et al. 2016; Sonderby et al. 2016): 0 at step 0, 1 at `warmup`."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def vae_loss(x, logits, mu, logvar, recon, log_sigma=None, kl_scale=1.0, free_bits=0.0):
    """Negative ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)) (Kingma & Welling 2014, eq. 10).

    `loss` is what is minimised: the KL is scaled by `kl_scale` (warm-up) and, with free bits
    (Kingma et al. 2016), each dimension's batch-mean KL counts as at least `free_bits` nats.
    `neg_elbo` is always the true, unscaled bound.
    """
    recon_nll = -log_likelihood(x, logits, recon, log_sigma).mean()
    kl_dims = gaussian_kl(mu.float(), logvar.float()).mean(0)      # (latent,)
    kl = kl_dims.sum()
    kl_term = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return {"loss": recon_nll + kl_scale * kl_term, "neg_elbo": recon_nll + kl,
            "recon": recon_nll, "kl": kl, "kl_dims": kl_dims}


@torch.no_grad()
def iw_log_likelihood(model, x, k, chunk=50, generator=None):
    """Importance-weighted estimate of log p(x) per image (Burda et al. 2016, eq. 8):
    log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x). k=1 is an unbiased ELBO sample."""
    mu, logvar = model.encoder(x)
    std = torch.exp(0.5 * logvar)
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mu.shape), device=x.device, generator=generator)
        z = mu + std * eps                                                 # (n, B, latent)
        logits = model.decoder(z.flatten(0, 1))                            # (n*B, C, H, W)
        log_px = log_likelihood(x.repeat(n, 1, 1, 1), logits, model.recon,
                                model.log_sigma).view(n, -1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * LOG_2PI).sum(-1)
        log_w.append(log_px + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), 0) - math.log(k)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def bits_per_dim(nll, dims, recon, binary):
    """Bits per dimension from an NLL in nats, where it is a proper likelihood of the data.
    Gaussian on 8-bit data: each pixel's bin has width 1/256, so log P = log p - log 256."""
    if recon == "bce":
        return nll / (dims * math.log(2)) if binary else None
    return (nll + dims * math.log(256)) / (dims * math.log(2))


@torch.no_grad()
def evaluate(model, images, device, seed=0, binarize=False, binary=False, iw_samples=0,
             iw_images=None, bf16=False):
    """Held-out negative ELBO, KL per dimension, active units and (optionally) the IW-NLL with
    `iw_samples` importance samples on the first `iw_images` images (default: all). The noise
    comes from its own generator seeded by `seed`; `binarize` draws x ~ Bernoulli(intensity)
    (dynamic binarisation); bits per dimension count pixels as binary with `binarize` or when
    the data are `binary` (exactly 0 or 255). The networks run in bf16 autocast with `bf16`;
    the bounds are computed in fp32.

    Sums stay on the device in compensated float32 (utils.Sums: no float64, which MPS lacks)
    and are read once at the end; under torchrun each rank scores its shard and the sums are
    added over ranks.
    """
    model.eval()
    gen = torch.Generator(device).manual_seed(seed + 1 + utils.DIST.rank)   # not training RNG
    latent = model.latent
    rank, world = utils.DIST.rank, utils.DIST.world
    # neg_elbo, recon, kl, count | kl per dim | sum mu | sum mu^2
    sums = utils.Sums(4 + 3 * latent, device)
    shard = images[rank::world]
    for x in utils.Progress(utils.iterate(shard, 500, device), total=math.ceil(len(shard) / 500),
                            desc="evaluation", unit="batch", what=f"{len(shard):,} images"):
        if binarize:
            x = torch.bernoulli(x, generator=gen)
        with utils.autocast(device, bf16):
            mu, logvar = model.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=device,
                                                            generator=gen)
            logits = model.decoder(z)
        terms = vae_loss(x, logits, mu, logvar, model.recon, model.log_sigma)
        n = len(x)
        sums.add(torch.cat([torch.stack([terms["neg_elbo"] * n, terms["recon"] * n,
                                         terms["kl"] * n, torch.tensor(n, device=device)]),
                            terms["kl_dims"] * n, mu.sum(0), mu.pow(2).sum(0)]))
    iw = utils.Sums(2, device)                                    # log-likelihood, count
    if iw_samples > 0:
        scored = images[:iw_images][rank::world]
        batch = max(1, 2000 // min(iw_samples, 50))               # ~2,000 images per decoder pass
        for x in utils.Progress(utils.iterate(scored, batch, device),
                                total=math.ceil(len(scored) / batch),
                                desc=f"IW-NLL (K={iw_samples})", unit="batch",
                                what=f"{len(scored):,} images", announce=True):
            if binarize:
                x = torch.bernoulli(x, generator=gen)
            with utils.autocast(device, bf16):
                ll = iw_log_likelihood(model, x, iw_samples, generator=gen)
            iw.add(torch.stack([ll.sum(), torch.tensor(len(x), device=device)]))
    model.train()
    sums, (iw_sum, iw_n) = sums.read(), iw.read()                  # float64, on the host
    n = sums[3]
    kl_dims, mu_sum, mu_sq = sums[4:].reshape(3, latent)
    result = {"neg_elbo": sums[0] / n, "recon": sums[1] / n, "kl": sums[2] / n,
              "kl_per_dim": (kl_dims / n).tolist(), "images": int(n)}
    # Active units (Burda et al. 2016): dimensions whose posterior mean varies with x, Cov > 0.01
    variance = (mu_sq - mu_sum ** 2 / n) / max(n - 1, 1)
    result["active_units"] = int((variance > 0.01).sum())
    if iw_n > 0:
        result.update(iw_nll=-iw_sum / iw_n, iw_samples=iw_samples, iw_images=int(iw_n))
    result["bits_per_dim"] = bits_per_dim(result.get("iw_nll", result["neg_elbo"]),
                                          images[0].numel(), model.recon, binary or binarize)
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in result.items()}


def iw_size(limit, held_out, train_images, k, floor=100):
    """How many held-out images the final IW-NLL scores: --iw-images if given; else all of
    them when the run trained on at least K/3 times as many images (an IW-NLL costs K decoder
    passes per image, a training image about three), else proportionally fewer, at least
    `floor`."""
    if limit is not None:
        return min(limit, held_out)
    return min(held_out, max(floor, 3 * train_images // max(k, 1)))


@torch.no_grad()
def save_images(model, images, out, device, seed, n=32):
    """reconstructions.png (originals above their reconstructions) and samples.png."""
    model.eval()
    cols = min(8, n, len(images))
    x = images[:min(n, len(images)) // cols * cols].to(device).float() / 255
    recon = model.mean_image(model.decoder(model.encoder(x)[0]))   # decode the posterior mean
    pairs = torch.stack([x.view(-1, cols, *x.shape[1:]), recon.view(-1, cols, *x.shape[1:])], 1)
    utils.save_grid(pairs.flatten(0, 2), out / "reconstructions.png", nrow=cols)
    gen = torch.Generator(device).manual_seed(seed)
    z = torch.randn(64, model.latent, device=device, generator=gen)
    utils.save_grid(model.mean_image(model.decoder(z)), out / "samples.png", nrow=8)
    model.train()


def plot_history(log, history, out):
    """losses.png: the running training loss per logged step and the held-out bound per epoch."""
    curves = {"train loss": ([r["step"] for r in log], [r["loss"] for r in log])}
    if history:
        curves["held-out -ELBO"] = ([h["step"] for h in history],
                                    [h["test_neg_elbo"] for h in history])
    utils.plot_curves(curves, out / "losses.png", xlabel="step", title="loss (nats per image)")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__.split("\n\n")[0])
    utils.add_common_args(p, latent=10, lr=1e-3, batch_size=128, epochs=10)
    add_vae_args(p, iw_samples=100)
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="dynamic binarisation, x ~ Bernoulli(intensity) redrawn every time "
                        "(default: on for mnist with --recon bce)")
    p.add_argument("--kl-warmup", type=utils.nonneg_int, default=0,
                   help="steps of linear KL warm-up from 0 to 1 (0 = none)")
    p.add_argument("--free-bits", type=utils.nonneg_float, default=0.0,
                   help="minimum KL per latent dimension in nats (0 = off)")
    p.add_argument("--width", type=utils.positive_int, default=32,
                   help="channels of the first conv layer")
    return p.parse_args(argv)


def add_vae_args(p, iw_samples):
    """The decoder and evaluation flags of standard_vae.py and beta_vae.py."""
    p.add_argument("--recon", default="bce", choices=("bce", "mse"),
                   help="decoder likelihood: bce = Bernoulli, mse = Gaussian")
    p.add_argument("--sigma", default="learned", type=utils.decoder_sigma,
                   help="Gaussian decoder std: 'learned' or a number such as 0.1 (--recon mse)")
    p.add_argument("--arch", default="conv", choices=ARCHS,
                   help="conv: strided convolutions, then FC layers; mlp: fully connected "
                        "(the beta-VAE paper's dSprites network, 1200 units)")
    p.add_argument("--hidden", type=utils.positive_int, default=None,
                   help="units of the FC layers (default: 256 with --arch conv, 1200 with mlp)")
    p.add_argument("--iw-samples", type=utils.nonneg_int, default=iw_samples,
                   help="importance samples K of the final IW-NLL (0 = skip)")
    p.add_argument("--iw-images", type=utils.positive_int, default=None,
                   help="held-out images scored by the IW-NLL (default: all when the run "
                        "trained on at least K/3 times as many, else proportionally fewer, at "
                        "least 100)")


def check_vae_args(args):
    """The defaults of add_vae_args that depend on another flag."""
    if args.hidden is None:
        args.hidden = HIDDEN[args.arch]
    return args


def check_args(args):
    utils.check_common_args(args, "standard_vae")
    check_vae_args(args)
    if args.binarize is None:
        args.binarize = args.dataset == "mnist" and args.recon == "bce"
    if args.binarize and args.recon != "bce":
        raise utils.UserError("--binarize goes with --recon bce")
    return args


# flags that may change when a run is resumed; everything else comes from the checkpoint
RESUME_FLAGS = ("epochs", "max_steps", "lr", "device", "out", "resume", "compile", "precision",
                "log_every", "eval_every", "eval_limit", "iw_samples", "iw_images", "data_root")


def build_model(args, channels, image_size):
    return VAE(channels, image_size, args.latent, default_widths(image_size, args.width),
               args.hidden, args.recon, args.sigma, getattr(args, "arch", "conv"))


def train_step(model, opt, x, loss_fn, bf16=False):
    """One optimiser step on a batch x (B, C, S, S) in [0, 1]: the forward pass (in bf16
    autocast with `bf16`), `loss_fn(x, logits, mu, logvar)`'s terms in fp32, backward, Adam.
    `model` is the VAE or its DDP/compiled wrapper. Returns the (device) terms."""
    with utils.autocast(x.device, bf16):
        logits, mu, logvar = model(x)
    terms = loss_fn(x, logits, mu, logvar)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    return terms


def fit(args, kind, build_model, loss_fn, log_keys=("loss", "recon", "kl"), schedule=None,
        extra_scores=None):
    """Train a VAE; also the loop of beta_vae.py, which differs only in `loss_fn`.

    `loss_fn(x, logits, mu, logvar, step, model, data_size)` returns the named terms; those
    of `log_keys` that it returns are logged, and `terms["loss"]` is minimised (`data_size`,
    the number of training images, serves estimators of the aggregate posterior). The loop is
    utils.train: data on the device, the held-out -ELBO scored and a checkpoint written at
    every epoch end, SIGINT/SIGTERM save the current step, and `--resume` continues exactly.
    The saved settings are written into `args` itself, so closures that read it see the
    run's settings. `schedule(total_steps)`, if given, is called once the run's length is
    known and returns lines to print (rank 0 prints them); `extra_scores(model, bf16)`, if
    given, adds its scores to each evaluation. Under torchrun each rank trains on
    its shard of every batch order with DistributedDataParallel; rank 0 alone writes. Returns
    the run state; a stop by a signal raises utils.Stopped once the checkpoint is saved.
    """
    dist, device, out, state, train, test = utils.start_run(
        args, kind, RESUME_FLAGS, check_image_size=feature_size)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    fast = utils.fast_paths(device)
    model = build_model(args, train.channels, train.image_size).to(device)
    if fast:                                      # NHWC convolutions are faster on GPUs
        model.to(memory_format=torch.channels_last)
    opt = utils.adam(model.parameters(), args.lr, device)
    binarize = getattr(args, "binarize", False)          # a flag of standard_vae.py alone
    batches = utils.DeviceBatches(train.images, args.batch_size, device, args.seed,
                                  binarize=binarize, rank=dist.rank, world=dist.world,
                                  channels_last=fast)
    torch.manual_seed(args.seed + 1_000_003 * dist.rank)         # each rank its own noise
    total = len(batches) * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    lines = schedule(total) if schedule is not None else []     # before the probe's steps
    x0 = batches.to_float(batches.images[:args.batch_size])        # the probe's batch
    bf16, why = utils.choose_precision(args.precision, device, model, args.lr, lambda m, o, bf16:
                                       train_step(m, o, x0, lambda *out: loss_fn(
                                           *out, 0, m, len(train)), bf16))
    args.precision = "bf16" if bf16 else "fp32"     # kept in the checkpoint: --resume goes on in it
    for line in [why, *lines]:
        if dist.main:
            print(line)

    def step_fn(fwd, x, step):
        terms = train_step(fwd, opt, x, lambda *out: loss_fn(*out, step, model, len(train)),
                           bf16)
        return {k: terms[k] for k in log_keys if k in terms}

    def score(last):
        res = evaluate(model, test.images, device, args.seed, binarize, test.binary, bf16=bf16)
        return {"train_loss": last["loss"], "test_neg_elbo": res["neg_elbo"],
                "test_recon": res["recon"], "test_kl": res["kl"],
                "kl_per_dim": res["kl_per_dim"],
                **(extra_scores(model, bf16) if extra_scores is not None else {})}

    loop = utils.train(
        model, opt, step_fn, batches.epoch, len(batches), total, out, kind=kind, args=args,
        lr=args.lr, state=state, evaluate=score, set_aside=args.resume or None,
        compile=args.compile, log_every=args.log_every, eval_every=args.eval_every,
        saved={"data": {"channels": train.channels, "image_size": train.image_size}},
        postfix=lambda r: {"loss": f"{r['loss']:.2f}", "kl": f"{r['kl']:.2f}"},
        what=f"{args.batch_size * dist.world} images each")
    return argparse.Namespace(
        args=args, model=model, train=train, test=test, device=device, out=out, log=loop.log,
        history=loop.history, step=loop.step, epochs=loop.epochs, train_time=loop.train_time,
        dist=dist, binarize=binarize, bf16=bf16, precision=why.split(": ", 1)[1],
        images_per_s=loop.steps_timed * args.batch_size * dist.world
        / max(loop.train_time, 1e-9))


def final_evaluation(run, args):
    """The held-out scores after training, with the IW-NLL (if --iw-samples) on as many
    images as the run's length warrants (`iw_size`), said before it starts."""
    n, trained = len(run.test), run.step * args.batch_size * run.dist.world
    iw_images = iw_size(args.iw_images, n, trained, args.iw_samples) if args.iw_samples > 0 \
        else 0
    if iw_images and run.dist.main:
        sized = "" if args.iw_images is not None else \
            f", sized to the run's {trained:,} training images; --iw-images sets it"
        print(f"IW-NLL: K={args.iw_samples} importance samples on {iw_images:,} of the {n:,} "
              f"held-out images ({iw_images * args.iw_samples:,} decoder passes{sized})")
    return evaluate(run.model, run.test.images, run.device, args.seed, run.binarize,
                    run.test.binary, args.iw_samples, iw_images, run.bf16)


def run_metrics(run, final, timer, **extra):
    """What metrics.json holds for a VAE run."""
    return {"test": final, "steps": run.step, "epochs": run.epochs, **extra,
            "train_images": len(run.train), "device": str(run.device),
            "train_time_s": run.train_time, "wall_time_s": timer(),
            "images_per_s": run.images_per_s, "world_size": run.dist.world,
            "precision": {"bf16": run.bf16, "why": run.precision},
            "torch": torch.__version__, "args": vars(run.args)}


def main(args):
    timer = utils.Timer()
    args = check_args(args)

    def loss_fn(x, logits, mu, logvar, step, model, data_size):
        return vae_loss(x, logits, mu, logvar, args.recon, model.log_sigma,
                        kl_weight(step, args.kl_warmup), args.free_bits)

    run = fit(args, "standard_vae", build_model, loss_fn)
    args, model, out = run.args, run.model, run.out
    final = final_evaluation(run, args)
    metrics = run_metrics(run, final, timer)
    if run.dist.main:
        save_images(model, run.test.images, out, run.device, args.seed)
        plot_history(run.log, run.history, out)
        utils.plot_bars(final["kl_per_dim"], out / "kl_per_dim.png",
                        title="held-out KL per latent dimension")
        utils.write_json(out / "metrics.json", metrics)
        iw = f", IW-NLL (K={args.iw_samples}) {final['iw_nll']:.2f}" if "iw_nll" in final else ""
        print(f"held-out -ELBO {final['neg_elbo']:.2f} nats{iw}; active units "
              f"{final['active_units']}/{args.latent}; outputs in {out}")
    utils.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    utils.run_command(main, parse_args)
