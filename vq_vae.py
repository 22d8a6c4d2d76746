"""Vector-quantised VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning"),
with a gated PixelCNN prior over its codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"; pixelcnn_prior.py).

A residual encoder maps x to a grid of vectors z_e(x); each is replaced by its nearest codebook
entry e_k, k = argmin_j ||z_e - e_j||^2, and a decoder reconstructs x from the grid of codes.
The gradient skips the non-differentiable lookup (straight-through), and the loss is (eq. 3)

    L = ||x - D(e)||^2 / Var[x] + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2.

With `--codebook ema` (the default, paper appendix A.1) the middle term is replaced by an
exponential moving average of the encoder outputs assigned to each code. Codes that stop being
used are re-seeded from encoder outputs of the current batch (dead-code restart).

Once the VQ-VAE is trained, `--prior-epochs N` fits a gated PixelCNN to the code grids of the
training set; ancestral sampling over the grid, then decoding, gives new images.

Under torchrun (`torchrun --nproc_per_node=4 vq_vae.py ...`) both phases train with
DistributedDataParallel, each rank on its shard of every epoch's order (`--batch-size` and
`--prior-batch-size` are per rank). The EMA counts and sums are summed over ranks before each
update and dead-code restarts are drawn on rank 0 and broadcast, so the codebooks stay identical;
rank 0 alone writes.

    python vq_vae.py --dataset dsprites --limit 20000 --eval-limit 2000 --batch-size 32 \
        --hidden 64 --max-steps 1200 --epochs 2 --prior-epochs 1 --prior-batch-size 32 \
        --prior-channels 64 --prior-layers 6 --prior-lr 1e-3 --prior-conditional

Flags: `--latent` is the dimension D of each code vector, `--codes` the codebook size K. The
defaults are the CIFAR-10 configuration of the widely used reimplementations of the paper
(docs/papers.md): 128 hidden channels, 2 residual layers of 32, 512 codes of dimension 64,
batch 256, Adam lr 1e-3, commitment beta 0.25, EMA decay 0.99; they train 15,000 steps:
`--dataset cifar10 --epochs 77 --max-steps 15000`.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelcnn_prior
import utils
from training import (arguments, checkpoints, console, devices, distributed, files, loop,
                      progress, sizes)
from training.errors import CheckpointError, UserError

LAPLACE_EPS = 1e-5          # N_i smoothed with eps = 1e-5, as the authors' Sonnet quantiser does


# ----------------------------------------------------------------------------------------------
# Encoder and decoder (residual, as in the paper: two 4x4 stride-2 convolutions, a 3x3
# convolution, residual blocks ReLU-3x3-ReLU-1x1)
# ----------------------------------------------------------------------------------------------
def grid_size(image_size):
    """Side of the code grid: the image halved twice (28 -> 7, 32 -> 8, 64 -> 16)."""
    if image_size % 4 != 0:
        raise UserError(f"unsupported image size {image_size}: the VQ-VAE halves it twice, "
                        "so it must be a multiple of 4 (28, 32 and 64 work)")
    return image_size // 4


class ResidualStack(nn.Module):
    """`layers` blocks x + conv1x1(relu(conv3x3(relu(x)))), then a ReLU; shape-preserving."""

    def __init__(self, channels, res_hidden, layers):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_hidden, 3, padding=1),
                          nn.ReLU(inplace=True), nn.Conv2d(res_hidden, channels, 1))
            for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """x (B, C, S, S) -> z_e (B, D, S/4, S/4)."""

    def __init__(self, channels, hidden, res_hidden, res_layers, code_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden // 2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),                 # (B, hidden, S/4, S/4)
            ResidualStack(hidden, res_hidden, res_layers),
            nn.Conv2d(hidden, code_dim, 1))                          # (B, D, S/4, S/4)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """Quantised grid (B, D, S/4, S/4) -> reconstruction (B, C, S, S) in the [-0.5, 0.5] scale."""

    def __init__(self, channels, hidden, res_hidden, res_layers, code_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(code_dim, hidden, 3, padding=1),                # (B, hidden, S/4, S/4)
            ResidualStack(hidden, res_hidden, res_layers),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),                                    # (B, hidden/2, S/2, S/2)
            nn.ConvTranspose2d(hidden // 2, channels, 4, stride=2, padding=1))  # (B, C, S, S)

    def forward(self, q):
        return self.net(q)


# ----------------------------------------------------------------------------------------------
# Vector quantiser
# ----------------------------------------------------------------------------------------------
def laplace_smoothing(counts, eps):
    """N_i -> (N_i + eps) / (sum N + K eps) * sum N: no count is zero and the total is kept.
    Returns a new tensor; the raw counts are never overwritten (that would compound each step)."""
    total = counts.sum()
    return (counts + eps) / (total + counts.numel() * eps) * total


def perplexity(counts):
    """exp(entropy) of the code distribution given by assignment counts (K,): the effective
    number of codes in use, K when all are used equally, 1 after a total collapse."""
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook of K vectors of dimension D.

    `codebook="ema"`: the codebook is a buffer set to m_i / N_i from exponential moving averages
    of the counts N_i and sums m_i of the encoder outputs assigned to each code (paper, A.1).
    `codebook="loss"`: the codebook is an nn.Parameter trained by the term ||sg[z_e] - e||^2.
    In both variants `ema_count` tracks usage, and with `restart` a code whose count falls below
    `restart_threshold` is re-seeded from an encoder output of the current batch.
    State changes only in training mode.
    """

    def __init__(self, num_codes, code_dim, codebook="ema", decay=0.99, eps=LAPLACE_EPS,
                 restart=True, restart_threshold=1.0):
        super().__init__()
        if codebook not in ("ema", "loss"):
            raise UserError(f"unknown codebook update {codebook!r}; use ema or loss")
        self.num_codes, self.code_dim, self.kind = num_codes, code_dim, codebook
        self.decay, self.eps = decay, eps
        self.restart, self.restart_threshold = restart, restart_threshold
        init = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if codebook == "ema":
            self.register_buffer("codebook", init)                       # (K, D)
            # Each code starts as if it had been assigned once, to itself: m / N = its init.
            self.register_buffer("ema_sum", init.clone())                # m_i (K, D)
        else:
            self.codebook = nn.Parameter(init)                           # (K, D)
        self.register_buffer("ema_count", torch.ones(num_codes))         # N_i (K,)

    @torch.no_grad()
    def nearest(self, flat):
        """Index of the nearest code for each row of `flat` (N, D) and the squared distance to
        it, both (N,), computed in fp32."""
        with devices.autocast_off(flat.device):
            z, e = flat.float(), self.codebook.float()
            # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2                         (N, K)
            dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)
            nearest = dist.min(1)
            return nearest.indices, nearest.values.clamp(min=0)

    def lookup(self, indices):
        """Codes of an index grid (B, H, W) -> (B, D, H, W)."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    @torch.compiler.disable          # under --compile: its in-place buffer updates run eagerly
    def forward(self, z_e):
        """z_e (B, D, H, W) -> quantised (B, D, H, W) with a straight-through gradient,
        indices (B, H, W) and named terms (commitment, codebook, perplexity, used)."""
        b, d, h, w = z_e.shape
        z = z_e.float()
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)                         # (B*H*W, D)
        indices, dist = self.nearest(flat)                                  # (B*H*W,) each
        q = F.embedding(indices, self.codebook).view(b, h, w, d).permute(0, 3, 1, 2)
        terms = {
            "commitment": F.mse_loss(z, q.detach()),                        # ||z_e - sg[e]||^2
            "codebook": (F.mse_loss(z.detach(), q) if self.kind == "loss"   # ||sg[z_e] - e||^2
                         else z.new_zeros(())),
        }
        # n_i (K,): from the EMA update, else a one-hot sum (torch.bincount syncs on CUDA)
        if self.training and self.kind == "ema":
            counts = self.ema_update(flat, indices)
        else:
            counts = F.one_hot(indices, self.num_codes).sum(0).float()
        if self.training:
            # under torchrun the counts (and sums) of all ranks' batches, so that every rank
            # makes the same update and the usage terms describe the global batch
            if self.kind == "loss":
                with torch.no_grad():
                    counts = distributed.all_reduce_sum(counts)
                    self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            if self.restart:
                self.restart_dead_codes(flat, dist)
        terms["perplexity"] = perplexity(counts)
        terms["used"] = (counts > 0).float().mean()
        # Straight-through (paper, sec. 3.1): the value is exactly e, the gradient with respect to
        # z_e is the identity (z - sg[z] is 0 with derivative 1), none reaches the codebook.
        quantized = q.detach() + (z - z.detach())
        return quantized, indices.view(b, h, w), terms

    @torch.no_grad()
    def ema_update(self, flat, indices):
        """One EMA step on encoder outputs `flat` (N, D) assigned to `indices` (N,):
        N_i <- d N_i + (1-d) n_i ; m_i <- d m_i + (1-d) sum_{j: k_j = i} z_j ;
        e_i = m_i / N_i' with N_i' the Laplace-smoothed counts (a copy; the buffer stays raw).
        Under torchrun n_i and the sums run over every rank's batch (one all-reduce), so all
        ranks apply the same update. Returns n_i (K,)."""
        with devices.autocast_off(flat.device):                             # fp32 sums
            onehot = F.one_hot(indices, self.num_codes).type_as(flat)      # (N, K)
            stats = torch.cat([onehot.sum(0)[:, None], onehot.t() @ flat], 1)  # n_i | sums
        counts, sums = distributed.all_reduce_sum(stats).split([1, self.code_dim], 1)
        counts = counts[:, 0]                                               # n_i (K,)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        smoothed = laplace_smoothing(self.ema_count, self.eps)
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, flat, dist):
        """Re-seed every code whose usage count N_i is below the threshold with an encoder output
        of the current batch (as in Dhariwal et al. 2020, Jukebox): a row of `flat` (N, D) drawn
        with probability proportional to its squared distance `dist` (N,) to its nearest code,
        the k-means++ seeding rule (Arthur & Vassilvitskii 2007). New codes thus go where the
        codebook quantises worst, not onto copies of the most frequent vector (dSprites'
        background), where they would only take that vector's assignments from a live code.

        A re-seeded code gets N_i = threshold and m_i = threshold * z, so m_i / N_i is its new
        vector and it stays alive while it draws at least `threshold` assignments per step.
        Branch-free (K rows are always drawn from the torch RNG) so that there is no host-device
        sync and the RNG advances identically every step: a resumed run repeats it exactly.
        Under torchrun every rank draws, but rank 0's rows are broadcast and used by all; the
        counts that mark the dead codes are already the same on every rank."""
        dead = self.ema_count < self.restart_threshold                      # (K,)
        weights = dist.float() + 1e-12                 # all rows equally likely if all are exact
        new = flat[torch.multinomial(weights, self.num_codes, replacement=True)]   # (K, D)
        new = distributed.broadcast(new.contiguous())
        self.codebook.copy_(torch.where(dead[:, None], new.to(self.codebook.dtype),
                                        self.codebook))
        self.ema_count.copy_(torch.where(dead, self.restart_threshold, self.ema_count))
        if self.kind == "ema":
            self.ema_sum.copy_(torch.where(dead[:, None], new * self.restart_threshold,
                                           self.ema_sum))


def centred(x):
    """Images in [0, 1] -> [-0.5, 0.5], the scale the VQ-VAE encodes and reconstructs in (that
    of the widely used reimplementations, docs/papers.md); `image` maps a reconstruction back."""
    return x - 0.5


def image(recon):
    """A reconstruction in the centred scale -> an image in [0, 1] (fp32)."""
    return (recon.float() + 0.5).clamp(0, 1)


class VQVAE(nn.Module):
    """Encoder, quantiser and decoder. Images come in [0, 1]; the networks work in the centred
    scale [-0.5, 0.5] (`centred`), and reconstructions come back in it."""

    def __init__(self, channels, hidden=128, res_hidden=32, res_layers=2, num_codes=512,
                 code_dim=64, **quantizer):
        super().__init__()
        self.encoder = Encoder(channels, hidden, res_hidden, res_layers, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, **quantizer)
        self.decoder = Decoder(channels, hidden, res_hidden, res_layers, code_dim)

    def forward(self, x):
        """x (B, C, S, S) in [0, 1] -> reconstruction (centred scale), indices (B, S/4, S/4),
        terms."""
        q, indices, terms = self.quantizer(self.encoder(centred(x)))  # distances in fp32 inside
        return self.decoder(q), indices, terms

    @torch.no_grad()
    def codes(self, x):
        """Code grid (B, S/4, S/4) of x in [0, 1]; never touches the quantiser's state."""
        return self.quantize(self.encoder(centred(x)))

    @torch.no_grad()
    def quantize(self, z_e):
        """Encoder outputs z_e (B, D, H, W) -> the grid (B, H, W) of their nearest codes."""
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)                 # (B*H*W, D)
        return self.quantizer.nearest(flat)[0].view(b, h, w)

    @torch.no_grad()
    def decode_codes(self, indices):
        """Code grid (B, H, W) -> image (B, C, 4H, 4W) in [0, 1]."""
        return image(self.decoder(self.quantizer.lookup(indices)))


# ----------------------------------------------------------------------------------------------
# Loss and training step
# ----------------------------------------------------------------------------------------------
def vq_vae_loss(x, recon, vq_terms, data_variance, beta):
    """L = ||x - D(e)||^2 / Var[x] + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2 (paper, eq. 3).
    The reconstruction term is the mean squared error over pixels divided by the training-set
    variance ("recon error"); the codebook term is zero with the EMA codebook."""
    recon_error = F.mse_loss(recon.float(), x) / data_variance
    loss = recon_error + vq_terms["codebook"] + beta * vq_terms["commitment"]
    return {"loss": loss, "recon_error": recon_error, **vq_terms}


TRAIN_TERMS = ("loss", "recon_error", "commitment", "codebook", "perplexity", "used")


def train_step(model, opt, x, data_variance, beta, precision="fp32", scaler=devices.NO_SCALER):
    """One optimiser step on a batch x (B, C, S, S) in [0, 1] (autocast in `precision`; `scaler`
    scales an fp16 loss); returns the (device) terms. `model` is the VQ-VAE or its DDP/compiled
    wrapper (DDP averages the gradients over ranks; the quantiser runs eagerly under compile)."""
    with devices.autocast(x.device, precision):                   # the quantiser stays fp32
        recon, _, vq_terms = model(x)                                      # (B, C, S, S)
    terms = vq_vae_loss(centred(x), recon, vq_terms, data_variance, beta)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()          # times the fp16 loss scale (else as is)
    scaler.step(opt)                                # skipped if a scaled gradient overflowed
    scaler.update()
    return terms


# ----------------------------------------------------------------------------------------------
# Evaluation and outputs
# ----------------------------------------------------------------------------------------------
def data_variance(images, device):
    """Variance of the pixel values in [0, 1] over a whole uint8 split (computed once). Under
    torchrun every rank holds the whole training set and computes the same number."""
    s = s2 = 0.0
    for x in utils.iterate(images, 4096, device):
        s += x.sum().item()
        s2 += x.square().sum().item()
    n = images.numel()
    return s2 / n - (s / n) ** 2


@torch.no_grad()
def evaluate(model, images, variance, batch_size, device, precision="fp32"):
    """Held-out recon error (MSE / Var), PSNR, and code usage over the whole split.

    Sums stay on the device in compensated float32 (distributed.Sums: no float64, which MPS
    lacks) and are read once at the end; under torchrun each rank scores its shard and the sums
    and code counts are added over ranks. The network runs in autocast in `precision`.
    """
    model.eval()
    k = model.quantizer.num_codes
    # squared error, squared error in [0, 1], sum of batch perplexities, batches | counts (K,)
    sums = distributed.Sums(4 + k, device)
    shard = images[distributed.DIST.rank::distributed.DIST.world]
    bar = progress.bar(total=len(shard), desc="evaluation", unit="image")
    for x in utils.iterate(shard, batch_size, device):
        with devices.autocast(device, precision):
            recon, indices, _ = model(x)
        recon = recon.float()
        counts = torch.bincount(indices.flatten(), minlength=k).float()
        sums.add(torch.cat([torch.stack([
            F.mse_loss(recon, centred(x), reduction="sum"),
            F.mse_loss(image(recon), x, reduction="sum"),
            perplexity(counts), torch.ones((), device=device)]), counts]))
        bar.update(len(x))
    bar.close()
    model.train()
    sums = sums.read()                                            # float64, on the host
    (sq_err, sq_err01, batch_perplexity, batches), counts = sums[:4].tolist(), sums[4:]
    mse, mse01 = sq_err / images.numel(), sq_err01 / images.numel()
    counts = torch.from_numpy(counts.round().astype("int64"))     # exact: integers < 2^24
    used = int((counts > 0).sum())
    return {"recon_error": mse / variance, "mse": mse,
            # PSNR of the clamped reconstructions in [0, 1], from the MSE over the whole split
            "psnr": 10 * math.log10(1 / mse01) if mse01 > 0 else float("inf"),
            # perplexity of the code distribution over all held-out positions, and the mean
            # over batches of --batch-size images (the figure reference implementations print)
            "perplexity": perplexity(counts.float()).item(),
            "batch_perplexity": batch_perplexity / batches,
            "used_codes": used, "used_fraction": used / k,
            "dead_codes_percent": 100 * (k - used) / k,
            "images": len(images), "code_counts": counts.long().tolist()}


def save_reconstructions(model, images, path, device, n=32):
    """`n` held-out originals above their reconstructions (the decoded code grids)."""
    model.eval()
    utils.save_reconstructions(images, lambda x: model.decode_codes(model.codes(x)), path, device,
                               n)
    model.train()


def plot_code_usage(counts, path, title):
    """Histogram of code usage: the share of positions assigned to each code, codes sorted by
    use (utils.plot_bars sizes its figure per bar, too wide for hundreds of codes)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    share = (counts / counts.sum()).sort(descending=True).values
    fig, axes = utils.plot_figure(panel=(7, 3.5))
    ax = axes[0, 0]
    floor = share[share > 0].min().item() / 2                    # log scale: unused codes sit here
    ax.stairs(share.clamp(min=floor).tolist(), range(len(share) + 1), fill=True, baseline=floor)
    ax.set_yscale("log")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("share of held-out positions")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    utils.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    # the reimplementations' CIFAR-10 configuration (docs/papers.md): batch 256, Adam lr 1e-3,
    # codes of dimension 64
    arguments.add_common_args(p, utils.DATASETS, latent=64, lr=1e-3, batch_size=256, epochs=10,
                              latent_help="dimension D of each code vector")
    p.add_argument("--codes", default=512,
                   type=arguments.number(int, lambda v: v >= 2, "an integer >= 2"),
                   help="codebook size K")
    p.add_argument("--hidden", type=arguments.positive_int, default=128,
                   help="channels of the encoder/decoder trunk")
    p.add_argument("--res-hidden", type=arguments.positive_int, default=32,
                   help="hidden channels of each residual block")
    p.add_argument("--res-layers", type=arguments.nonneg_int, default=2,
                   help="residual blocks in the encoder and in the decoder")
    p.add_argument("--codebook", default="ema", choices=("ema", "loss"),
                   help="codebook update: ema = moving averages (paper, appendix), loss = the "
                        "codebook loss term ||sg[z_e] - e||^2")
    p.add_argument("--decay", default=0.99,
                   type=arguments.number(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
                   help="EMA decay of the codebook counts and sums")
    p.add_argument("--beta", type=arguments.nonneg_float, default=0.25,
                   help="commitment loss weight")
    p.add_argument("--no-restart", action="store_true",
                   help="turn dead-code restart off (restart is on by default)")
    p.add_argument("--restart-threshold", type=arguments.positive_float, default=1.0,
                   help="a code whose EMA count of assignments per step falls below this is "
                        "re-seeded from an encoder output of the current batch, drawn in "
                        "proportion to its squared distance to its nearest code")
    pixelcnn_prior.add_prior_args(p)
    return p.parse_args(argv)


def check_args(args):
    """What the flags' types cannot check alone (each number is checked as it is parsed)."""
    arguments.check_common_args(args, "vq_vae")
    if args.hidden % 2:
        raise UserError(f"--hidden must be even (the first layer has hidden/2 channels), "
                        f"got {args.hidden}")
    if args.prior_kernel % 2 == 0:
        raise UserError(f"--prior-kernel must be odd, got {args.prior_kernel}")
    if args.dataset in ("celeba", "folder"):
        grid_size(args.image_size)          # refused before anything is decoded
    epochs = sizes.prior_length(args.prior_epochs, args.prior_max_steps, args.epochs,
                                args.max_steps)[0]
    labelled = pixelcnn_prior.NUM_CLASSES
    if args.prior_conditional and epochs > 0 and args.dataset not in labelled:
        raise UserError(f"--prior-conditional needs class labels, which {args.dataset} "
                        f"does not have; it works with {', '.join(labelled)}")
    return args


# Flags that a resumed run takes from its command line when typed; the rest come from
# checkpoint.pt. The prior's own settings (pixelcnn_prior.PRIOR_FLAGS) may be typed until
# prior.pt exists; from then on they come from prior.pt.
RESUME_FLAGS = ("epochs", "max_steps", "lr", "device", "out", "resume", "compile", "precision",
                "deterministic", "log_every", "eval_every", "tensorboard", "eval_limit",
                "data_root", "data_on", "cache_dir", "labels", "prior_epochs", "prior_max_steps",
                "prior_lr")


def build_model(args, channels):
    return VQVAE(channels, args.hidden, args.res_hidden, args.res_layers, args.codes, args.latent,
                 codebook=args.codebook, decay=args.decay, restart=not args.no_restart,
                 restart_threshold=args.restart_threshold)


# ----------------------------------------------------------------------------------------------
# Training: the VQ-VAE, then the prior
# ----------------------------------------------------------------------------------------------
def training_variance(run, images, source):
    """The pixel variance the loss divides by: on --resume the checkpoint's, so that the run
    goes on dividing by the same number; else that of the training `images` (on the device),
    computed once. Zero variance is refused rather than divided by."""
    if run.state is not None:
        variance = run.state["data"].get("variance")
        if not isinstance(variance, float) or not 0 < variance < math.inf:
            raise CheckpointError(f"{run.out / 'checkpoint.pt'} cannot be resumed: its data "
                                  f"variance is {variance!r}, not a positive number")
        return variance
    variance = data_variance(images, run.device)
    if not variance > 1e-10:
        raise UserError(f"the {len(images)} training images of {source} have zero pixel "
                        "variance (every pixel the same), and the VQ-VAE loss divides by it; "
                        "check the data files or --limit")
    return variance


SHOWN = {"recon_error": ".4f", "perplexity": ".0f"}     # the terms on the progress bar


def epoch_scores(scores, last):
    """What the history keeps of an evaluation: the last running training terms and the
    held-out scores (`evaluate`'s, but the code counts)."""
    return {"train_loss": last["loss"], "train_recon_error": last["recon_error"],
            "train_perplexity": last["perplexity"], "train_used": last["used"],
            **{f"test_{k}": v for k, v in scores.items() if k != "code_counts"}}


def describe(codes, h):
    """The line printed after each evaluation (`h`, its history entry)."""
    return (f"epoch {h['epoch']} step {h['step']}: held-out recon error "
            f"{h['test_recon_error']:.4f}, PSNR {h['test_psnr']:.1f} dB, perplexity "
            f"{h['test_perplexity']:.1f}, codes used {h['test_used_codes']}/{codes}")


def save_outputs(model, run, log, history, final, metrics, codes):
    """reconstructions.png, code_usage.png, losses.png and metrics.json."""
    save_reconstructions(model, run.test.images, run.out / "reconstructions.png", run.device)
    plot_code_usage(final["code_counts"], run.out / "code_usage.png",
                    f"held-out code usage: {final['used_codes']}/{codes} codes, "
                    f"perplexity {final['perplexity']:.0f}")
    steps = [r["step"] for r in log]
    curves = {"train loss": (steps, [r["loss"] for r in log]),
              "train recon error": (steps, [r["recon_error"] for r in log]),
              "train commitment": (steps, [r["commitment"] for r in log])}
    if history:
        curves["held-out recon error"] = ([h["step"] for h in history],
                                          [h["test_recon_error"] for h in history])
    utils.plot_curves(curves, run.out / "losses.png", logy=True,
                      title="VQ-VAE (recon error = MSE / Var[x], log scale)")
    files.write_json(run.out / "metrics.json", metrics)


def main(args):
    timer = console.Timer()
    args = check_args(args)
    # The same seed on every rank: the same initial weights. The only other use of the torch
    # RNG in training is the restart draw, which rank 0 makes for all ranks.
    run = loop.start_run(args, "vq_vae", RESUME_FLAGS + pixelcnn_prior.PRIOR_FLAGS,
                         utils.load_split, {**checkpoints.RESUME_KEYS, "data": dict})
    dist = distributed.DIST
    model = build_model(args, run.train.channels).to(run.device)
    opt = devices.adam(model.parameters(), args.lr, run.device)
    batches = utils.training_batches(run.train.images, args.batch_size, run.device, args.seed,
                                     rank=dist.rank, world=dist.world, data_on=args.data_on,
                                     mapped=run.train.mapped)
    variance = training_variance(run, batches.images, f"{args.dataset} in {args.data_root}")
    prior_epochs = sizes.prior_length(args.prior_epochs, args.prior_max_steps, args.epochs,
                                      args.max_steps)[0]
    if prior_epochs > 0 and len(run.train) // dist.world < args.prior_batch_size:
        raise UserError(f"{len(run.train)} code grids are fewer than one prior batch of "
                        f"{args.prior_batch_size}"
                        f"{f' on each of {dist.world} ranks' if dist.active else ''}; "
                        "lower --prior-batch-size")
    scaler = devices.grad_scaler(run.device, run.precision)
    score = partial(evaluate, model, run.test.images, variance, args.batch_size, run.device,
                    run.precision)
    settings = loop.Settings.from_args(args, "vq_vae", run, len(batches), shown=SHOWN, saved={
        "data": {"channels": run.train.channels, "image_size": run.train.image_size,
                 "variance": variance}})
    trained = loop.train(
        model, opt, lambda fwd, x, step: train_step(fwd, opt, x, variance, args.beta,
                                                    run.precision, scaler),
        batches.epoch, settings, run.state, evaluate=lambda last: epoch_scores(score(), last),
        describe=partial(describe, args.codes), scaler=scaler,
        pictures=lambda entry, folder: save_reconstructions(        # TensorBoard's images
            model, run.test.images, folder / "reconstructions.png", run.device, n=8))

    final = score()
    metrics = {"test": final, **loop.summary(trained, run), "data_variance": variance,
               "args": vars(args)}
    if dist.main:
        save_outputs(model, run, trained.log, trained.history, final,
                     {**metrics, "wall_time_s": timer()}, args.codes)
        print(f"held-out recon error {final['recon_error']:.4f}, PSNR {final['psnr']:.1f} dB, "
              f"perplexity {final['perplexity']:.1f}, codes used "
              f"{final['used_codes']}/{args.codes}; outputs in {run.out}")
    if prior_epochs > 0:
        metrics["prior"] = pixelcnn_prior.train_prior(
            args, model, run, trained.step, (grid_size(run.train.image_size),) * 2, RESUME_FLAGS)
        if dist.main:
            files.write_json(run.out / "metrics.json", {**metrics, "wall_time_s": timer()})
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    console.run_command(main, parse_args)
