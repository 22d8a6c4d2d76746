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
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from training import arguments, console, devices, distributed, files, loop, progress, sizes
from training.errors import UserError

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
        raise UserError(f"unsupported image size {image_size}: use 28, 32 or 64 "
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
    the posterior then collapses to the prior for good, and the decoder learns the mean image.
    He init keeps the signal through the ReLU layers, and the encoder learns."""
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


def training_loss(recon, kl_warmup=0, free_bits=0.0):
    """The loss this script trains with, as loss(x, logits, mu, logvar, log_sigma, step): the
    negative ELBO with the KL warmed up over `kl_warmup` steps and `free_bits` per dimension."""
    def loss(x, logits, mu, logvar, log_sigma, step):
        return vae_loss(x, logits, mu, logvar, recon, log_sigma, kl_weight(step, kl_warmup),
                        free_bits)
    return loss


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
             iw_images=None, precision="fp32"):
    """Held-out negative ELBO, KL per dimension, active units and (optionally) the IW-NLL with
    `iw_samples` importance samples on the first `iw_images` images (default: all). The noise
    comes from its own generator seeded by `seed`; `binarize` draws x ~ Bernoulli(intensity)
    (dynamic binarisation); bits per dimension count pixels as binary with `binarize` or when
    the data are `binary` (exactly 0 or 255). The networks run in autocast in `precision`
    ("bf16", "fp16" or "fp32"); the bounds are computed in fp32.

    Sums stay on the device in compensated float32 (distributed.Sums: no float64, which MPS
    lacks) and are read once at the end; under torchrun each rank scores its shard and the sums
    are added over ranks.
    """
    model.eval()
    rank, world = distributed.DIST.rank, distributed.DIST.world
    gen = torch.Generator(device).manual_seed(seed + 1 + rank)         # not the training RNG
    latent = model.latent
    # neg_elbo, recon, kl, count | kl per dim | sum mu | sum mu^2
    sums = distributed.Sums(4 + 3 * latent, device)
    shard = images[rank::world]
    for x in progress.bar(utils.iterate(shard, 500, device), total=math.ceil(len(shard) / 500),
                          desc="evaluation", unit="batch", what=f"{len(shard):,} images"):
        if binarize:
            x = torch.bernoulli(x, generator=gen)
        with devices.autocast(device, precision):
            mu, logvar = model.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=device,
                                                            generator=gen)
            logits = model.decoder(z)
        terms = vae_loss(x, logits, mu, logvar, model.recon, model.log_sigma)
        n = len(x)
        sums.add(torch.cat([torch.stack([terms["neg_elbo"] * n, terms["recon"] * n,
                                         terms["kl"] * n, torch.tensor(n, device=device)]),
                            terms["kl_dims"] * n, mu.float().sum(0), mu.float().pow(2).sum(0)]))
    iw = distributed.Sums(2, device)                                    # log-likelihood, count
    if iw_samples > 0:
        scored = images[:iw_images][rank::world]
        batch = max(1, 2000 // min(iw_samples, 50))               # ~2,000 images per decoder pass
        for x in progress.bar(utils.iterate(scored, batch, device),
                              total=math.ceil(len(scored) / batch),
                              desc=f"IW-NLL (K={iw_samples})", unit="batch",
                              what=f"{len(scored):,} images", announce=True):
            if binarize:
                x = torch.bernoulli(x, generator=gen)
            with devices.autocast(device, precision):
                ll = iw_log_likelihood(model, x, iw_samples, generator=gen)
            iw.add(torch.stack([ll.sum(), torch.tensor(len(x), device=device)]))
    model.train()
    sums, (iw_sum, iw_n) = sums.read(), iw.read()                  # float64, on the host
    n, (kl_dims, mu_sum, mu_sq) = sums[3], sums[4:].reshape(3, latent)
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


def prior_codes(n, latent, generator, temperature=1.0):
    """z ~ N(0, T^2 I), (n, latent), drawn from `generator` on its device: the prior's standard
    deviation scaled by the temperature T. The codes of samples.png (T = 1) and of
    trained.VAE.sample, so that the two draw the same images from the same seed."""
    return temperature * torch.randn(n, latent, device=generator.device, generator=generator)


@torch.no_grad()
def save_images(model, images, out, device, seed, n=32, samples=64):
    """reconstructions.png (`n` originals above their reconstructions) and samples.png."""
    model.eval()
    utils.save_reconstructions(images, lambda x: model.mean_image(model.decoder(
        model.encoder(x)[0])), out / "reconstructions.png", device, n)     # the posterior mean
    z = prior_codes(samples, model.latent, torch.Generator(device).manual_seed(seed))
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
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    arguments.add_common_args(p, utils.DATASETS, latent=10, lr=1e-3, batch_size=128, epochs=10)
    add_vae_args(p, iw_samples=100)
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="dynamic binarisation, x ~ Bernoulli(intensity) redrawn every time "
                        "(default: on for mnist with --recon bce)")
    p.add_argument("--kl-warmup", type=arguments.nonneg_int, default=0,
                   help="steps of linear KL warm-up from 0 to 1 (0 = none)")
    p.add_argument("--free-bits", type=arguments.nonneg_float, default=0.0,
                   help="minimum KL per latent dimension in nats (0 = off)")
    p.add_argument("--width", type=arguments.positive_int, default=32,
                   help="channels of the first conv layer")
    return p.parse_args(argv)


def add_vae_args(p, iw_samples):
    """The decoder and evaluation flags of standard_vae.py and beta_vae.py."""
    p.add_argument("--recon", default="bce", choices=("bce", "mse"),
                   help="decoder likelihood: bce = Bernoulli, mse = Gaussian")
    p.add_argument("--sigma", default="learned", type=arguments.decoder_sigma,
                   help="Gaussian decoder std: 'learned' or a number such as 0.1 (--recon mse)")
    p.add_argument("--arch", default="conv", choices=ARCHS,
                   help="conv: strided convolutions, then FC layers; mlp: fully connected "
                        "(the beta-VAE paper's dSprites network, 1200 units)")
    p.add_argument("--hidden", type=arguments.positive_int, default=None,
                   help="units of the FC layers (default: 256 with --arch conv, 1200 with mlp)")
    p.add_argument("--iw-samples", type=arguments.nonneg_int, default=iw_samples,
                   help="importance samples K of the final IW-NLL (0 = skip)")
    p.add_argument("--iw-images", type=arguments.positive_int, default=None,
                   help="held-out images scored by the IW-NLL (default: all when the run "
                        "trained on at least K/3 times as many, else proportionally fewer, at "
                        "least 100)")


def check_vae_args(args):
    """The defaults of add_vae_args that depend on another flag; a CelebA --image-size that
    the networks cannot take is refused before anything is decoded."""
    if args.hidden is None:
        args.hidden = HIDDEN[args.arch]
    if args.dataset in ("celeba", "folder"):
        feature_size(args.image_size)
    return args


def check_args(args):
    arguments.check_common_args(args, "standard_vae")
    check_vae_args(args)
    if args.binarize is None:
        args.binarize = args.dataset == "mnist" and args.recon == "bce"
    if args.binarize and args.recon != "bce":
        raise UserError("--binarize goes with --recon bce")
    return args


# flags that may change when a run is resumed; everything else comes from the checkpoint
RESUME_FLAGS = ("epochs", "max_steps", "lr", "device", "out", "resume", "compile", "precision",
                "deterministic", "log_every", "eval_every", "tensorboard", "eval_limit",
                "iw_samples", "iw_images", "data_root", "data_on", "cache_dir", "labels")


def build_model(args, channels, image_size):
    return VAE(channels, image_size, args.latent, default_widths(image_size, args.width),
               args.hidden, args.recon, args.sigma, getattr(args, "arch", "conv"))


def setup(model, device, train, lr, batch_size, seed, binarize=False, data_on="auto"):
    """A VAE run's model on `device`, its Adam and the batches of the `train` split (here and
    in beta_vae.py), from the device or from host memory (`data_on`, utils.training_batches,
    which says which). On the GPU paths (devices.FAST_PATHS) the model and the batches are
    channels-last: NHWC convolutions are faster there. Then each rank draws its own noise."""
    fast = devices.fast_paths(device)
    model = model.to(device)
    if fast:
        model.to(memory_format=torch.channels_last)
    opt = devices.adam(model.parameters(), lr, device)
    rank, world = distributed.DIST.rank, distributed.DIST.world
    batches = utils.training_batches(train.images, batch_size, device, seed, binarize, rank,
                                     world, fast, data_on, train.mapped)
    torch.manual_seed(seed + 1_000_003 * rank)     # the same initial weights, then own noise
    return model, opt, batches


def train_step(model, opt, x, loss_fn, precision="fp32", scaler=devices.NO_SCALER):
    """One optimiser step on a batch x (B, C, S, S) in [0, 1]: the forward pass (in autocast
    in `precision`), `loss_fn(x, logits, mu, logvar)`'s terms in fp32, backward, Adam. With
    fp16, `scaler` (devices.grad_scaler) scales the loss. `model` is the VAE or its
    DDP/compiled wrapper. Returns the (device) terms."""
    with devices.autocast(x.device, precision):
        logits, mu, logvar = model(x)
    terms = loss_fn(x, logits, mu, logvar)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()          # times the fp16 loss scale (else as is)
    scaler.step(opt)                                # skipped if a scaled gradient overflowed
    scaler.update()
    return terms


LOGGED = ("loss", "recon", "kl", "kl_dims")         # vae_loss's terms in the training log
SHOWN = {"loss": ".2f", "kl": ".2f"}                # and those on the progress bar


def epoch_scores(scores, last):
    """What the history keeps of an evaluation: the last running training loss and the
    held-out bound, its terms, the KL per dimension and the active units."""
    return {"train_loss": last["loss"], "test_neg_elbo": scores["neg_elbo"],
            "test_recon": scores["recon"], "test_kl": scores["kl"],
            "kl_per_dim": scores["kl_per_dim"], "test_active_units": scores["active_units"]}


def final_evaluation(score, held_out, trained_images, iw_samples, iw_images):
    """The held-out scores after training (`score`, evaluate with its data and noise bound),
    with the IW-NLL (if `iw_samples`) on as many images as the run's length warrants
    (sizes.iw_size), said before it starts."""
    n = sizes.iw_size(iw_images, held_out, trained_images, iw_samples) if iw_samples > 0 else 0
    if n and distributed.DIST.main:
        sized = "" if iw_images is not None else \
            f", sized to the run's {trained_images:,} training images; --iw-images sets it"
        print(f"IW-NLL: K={iw_samples} importance samples on {n:,} of the {held_out:,} "
              f"held-out images ({n * iw_samples:,} decoder passes{sized})")
    return score(iw_samples=iw_samples, iw_images=n)


def save_outputs(model, run, log, history, final, metrics, seed):
    """reconstructions.png, samples.png, losses.png, kl_per_dim.png and metrics.json."""
    save_images(model, run.test.images, run.out, run.device, seed)
    plot_history(log, history, run.out)
    utils.plot_bars(final["kl_per_dim"], run.out / "kl_per_dim.png",
                    title="held-out KL per latent dimension")
    files.write_json(run.out / "metrics.json", metrics)


def main(args):
    timer = console.Timer()
    args = check_args(args)
    run = loop.start_run(args, "standard_vae", RESUME_FLAGS, utils.load_split)
    model, opt, batches = setup(build_model(args, run.train.channels, run.train.image_size),
                                run.device, run.train, args.lr, args.batch_size, args.seed,
                                args.binarize, args.data_on)
    loss = training_loss(args.recon, args.kl_warmup, args.free_bits)
    scaler = devices.grad_scaler(run.device, run.precision)
    score = partial(evaluate, model, run.test.images, run.device, args.seed, args.binarize,
                    run.test.binary, precision=run.precision)
    settings = loop.Settings.from_args(args, "standard_vae", run, len(batches), logged=LOGGED,
                                       shown=SHOWN)
    trained = loop.train(
        model, opt, lambda fwd, x, step: train_step(
            fwd, opt, x, partial(loss, log_sigma=model.log_sigma, step=step), run.precision,
            scaler),
        batches.epoch, settings, run.state, evaluate=lambda last: epoch_scores(score(), last),
        scaler=scaler, pictures=lambda entry, folder: save_images(     # TensorBoard's images
            model, run.test.images, folder, run.device, args.seed, n=8, samples=16))

    final = final_evaluation(score, len(run.test), trained.step * settings.batch,
                             args.iw_samples, args.iw_images)
    metrics = {"test": final, **loop.summary(trained, run), "wall_time_s": timer(),
               "args": vars(args)}
    if distributed.DIST.main:
        save_outputs(model, run, trained.log, trained.history, final, metrics, args.seed)
        iw = f", IW-NLL (K={args.iw_samples}) {final['iw_nll']:.2f}" if "iw_nll" in final else ""
        print(f"held-out -ELBO {final['neg_elbo']:.2f} nats{iw}; active units "
              f"{final['active_units']}/{args.latent}; outputs in {run.out}")
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    console.run_command(main, parse_args)
