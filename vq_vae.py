"""Vector-quantised VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning"),
with a gated PixelCNN prior over its codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders").

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
defaults are the reference CIFAR-10 configuration (REFERENCE.md): 128 hidden channels, 2
residual layers of 32, 512 codes of dimension 64, batch 256, Adam lr 1e-3; the reported run is
15,000 steps: `--dataset cifar10 --epochs 77 --max-steps 15000`.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from training import (arguments, checkpoints, console, devices, distributed, files, loop,
                      progress, sizes)
from training.errors import CheckpointError, UserError

LAPLACE_EPS = 1e-5          # REFERENCE.md: N_i smoothed with eps = 1e-5
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "dsprites": utils.DSPRITES_SIZES[1]}  # dSprites: shape


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


class VQVAE(nn.Module):
    def __init__(self, channels, hidden=128, res_hidden=32, res_layers=2, num_codes=512,
                 code_dim=64, **quantizer):
        super().__init__()
        self.encoder = Encoder(channels, hidden, res_hidden, res_layers, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, **quantizer)
        self.decoder = Decoder(channels, hidden, res_hidden, res_layers, code_dim)

    def forward(self, x):
        """x (B, C, S, S) in [-0.5, 0.5] -> reconstruction, indices (B, S/4, S/4), terms."""
        q, indices, terms = self.quantizer(self.encoder(x))    # distances in fp32 inside
        return self.decoder(q), indices, terms

    @torch.no_grad()
    def codes(self, x):
        """Code grid (B, S/4, S/4) of x in [-0.5, 0.5]; never touches the quantiser's state."""
        z = self.encoder(x).float()                                         # (B, D, H, W)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))[0].view(b, h, w)

    @torch.no_grad()
    def decode_codes(self, indices):
        """Code grid (B, H, W) -> image (B, C, 4H, 4W) in [0, 1]."""
        return (self.decoder(self.quantizer.lookup(indices)).float() + 0.5).clamp(0, 1)


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
    x = x - 0.5                                    # the reference scales images to [-0.5, 0.5]
    with devices.autocast(x.device, precision):                   # the quantiser stays fp32
        recon, _, vq_terms = model(x)                                      # (B, C, S, S)
    terms = vq_vae_loss(x, recon, vq_terms, data_variance, beta)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()          # times the fp16 loss scale (else as is)
    scaler.step(opt)                                # skipped if a scaled gradient overflowed
    scaler.update()
    return terms


# ----------------------------------------------------------------------------------------------
# Gated PixelCNN prior over the code grid (van den Oord et al. 2016)
# ----------------------------------------------------------------------------------------------
def shift_down(x):
    """Move rows down by one (row 0 becomes zeros): row i then holds what row i-1 saw."""
    return F.pad(x, (0, 0, 1, -1))


def shift_right(x):
    """Move columns right by one (column 0 becomes zeros)."""
    return F.pad(x, (1, -1, 0, 0))


def gate(x):
    """tanh(a) * sigmoid(b) over the two halves of the channels (paper, eq. 2)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (paper, fig. 2).

    Vertical stack: a (k//2+1) x k convolution padded only above, so row i sees rows <= i. It
    reaches the horizontal stack shifted down one row, i.e. only rows < i: with rows < i taken
    whole, there is no blind spot. Horizontal stack: a 1 x (k//2+1) convolution padded only on
    the left (columns <= j of row i), its input shifted right by one in the first layer so that
    no position sees itself; later layers add a residual connection.
    """

    def __init__(self, channels, kernel, first=False, num_classes=0):
        super().__init__()
        self.pad, self.first = kernel // 2, first
        self.v_conv = nn.Conv2d(channels, 2 * channels, (kernel // 2 + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, kernel // 2 + 1))
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, v, h, labels=None):
        v_out, above = self.vertical(v, labels)
        return v_out, self.horizontal(h, above, labels)

    def vertical(self, v, labels=None):
        """The vertical stack: its output, and what it passes to the horizontal stack (each
        row holds the features of the rows above it only)."""
        p = self.pad
        v_feat = self.v_conv(F.pad(v, (p, p, p, 0)))                        # (B, 2C, H, W)
        above = self.v_to_h(shift_down(v_feat))                              # rows < i
        return gate(self.conditioned(v_feat, labels)), above

    def horizontal(self, h, above, labels=None):
        """The horizontal stack on rows of `h`, given the vertical stack's `above` for them."""
        h_in = shift_right(h) if self.first else h
        h_feat = self.conditioned(self.h_conv(F.pad(h_in, (self.pad, 0, 0, 0))) + above, labels)
        h_new = self.h_out(gate(h_feat))                                    # (B, C, H, W)
        return h_new if self.first else h + h_new

    def conditioned(self, feat, labels):
        """class conditioning: a learned bias per class on every gate (paper, eq. 4)"""
        if self.cond is None:
            return feat
        return feat + self.cond(labels)[:, :, None, None]                  # (B, 2C, 1, 1)


class GatedPixelCNN(nn.Module):
    """p(c) = prod_i p(c_i | c_<i [, class]) over a grid of K-way codes in raster order.
    Codes (B, H, W) -> logits (B, K, H, W); logit (i, j) depends only on earlier positions."""

    def __init__(self, num_codes, channels=128, layers=12, kernel=5, num_classes=0):
        super().__init__()
        self.embed = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel, first=i == 0, num_classes=num_classes)
            for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, num_codes, 1))

    def forward(self, codes, labels=None):
        x = self.embed(codes).permute(0, 3, 1, 2)                            # (B, C, H, W)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)                                                  # (B, K, H, W)

    def row_sampler(self, codes, i, labels=None):
        """logits(j) -> the logits (B, K) of position (i, j) of `codes` (B, H, W), whose rows
        < i are final. The vertical stack, which sees only rows < i at row i, runs once for
        the row; each position then runs only the horizontal stack and the head, on row i."""
        v = self.embed(codes[:, :i + 1]).permute(0, 3, 1, 2)                 # rows 0..i
        aboves = []
        for layer in self.layers:
            v, above = layer.vertical(v, labels)
            aboves.append(above[:, :, i:i + 1])                              # (B, 2C, 1, W)

        def logits(j):
            h = self.embed(codes[:, i:i + 1]).permute(0, 3, 1, 2)            # (B, C, 1, W)
            for layer, above in zip(self.layers, aboves):
                h = layer.horizontal(h, above, labels)
            return self.head(h[..., j:j + 1])[:, :, 0, 0]   # the head is 1x1: column j alone
        return logits


def prior_config(args, num_codes, grid, num_classes):
    """Everything needed to rebuild the prior; stored in prior.pt."""
    return {"num_codes": num_codes, "channels": args.prior_channels, "layers": args.prior_layers,
            "kernel": args.prior_kernel, "num_classes": num_classes, "grid": list(grid)}


def build_prior(config):
    return GatedPixelCNN(config["num_codes"], config["channels"], config["layers"],
                         config["kernel"], config["num_classes"])


def prior_nll(prior, codes, labels=None):
    """Mean negative log-likelihood in nats per code of code grids (B, H, W)."""
    return F.cross_entropy(prior(codes, labels).float(), codes.long())


def prior_train_step(prior, opt, codes, labels=None, precision="fp32", scaler=devices.NO_SCALER):
    """One optimiser step of the prior on code grids (B, H, W): the NLL of each code given the
    codes above and to its left (autocast in `precision`; `scaler` scales an fp16 loss),
    backward, Adam. `prior` is the PixelCNN or its DDP/compiled wrapper. Returns bits/code."""
    with devices.autocast(codes.device, precision):
        nll = prior_nll(prior, codes.long(), labels)
    opt.zero_grad(set_to_none=True)
    scaler.scale(nll).backward()
    scaler.step(opt)
    scaler.update()
    return {"bits_per_code": nll.detach() / math.log(2)}


@torch.no_grad()
def sample_codes(prior, n, grid, labels=None, generator=None):
    """Ancestral sampling in raster order, c_i ~ p(c_i | c_<i). The prior is causal, so each
    row's vertical stack runs once, on rows 0..i, and each position only the horizontal stack
    on its own row (GatedPixelCNN.row_sampler): the work grows as h*w rows, not h^2*w."""
    device = next(prior.parameters()).device
    h, w = grid
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    with progress.bar(total=h * w, desc=f"sampling {n} code grids", unit="position") as bar:
        for i in range(h):
            logits_at = prior.row_sampler(codes, i, labels)
            for j in range(w):
                logits = logits_at(j).float()                                     # (n, K)
                codes[:, i, j] = torch.multinomial(logits.softmax(1), 1,
                                                   generator=generator)[:, 0]
                bar.update(1)
    return codes


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
            recon, indices, _ = model(x - 0.5)
        recon = recon.float()
        counts = torch.bincount(indices.flatten(), minlength=k).float()
        sums.add(torch.cat([torch.stack([
            F.mse_loss(recon, x - 0.5, reduction="sum"),
            F.mse_loss((recon + 0.5).clamp(0, 1), x, reduction="sum"),
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


@torch.no_grad()
def save_reconstructions(model, images, path, device, n=32):
    """Held-out originals above their reconstructions, 8 per row (fewer if fewer images)."""
    model.eval()
    cols = min(8, n, len(images))
    x = images[:min(n, len(images)) // cols * cols].to(device).float() / 255
    recon = model.decode_codes(model.codes(x - 0.5))
    pairs = torch.stack([x.view(-1, cols, *x.shape[1:]), recon.view(-1, cols, *x.shape[1:])], 1)
    utils.save_grid(pairs.flatten(0, 2), path, nrow=cols)
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


def class_labels(data):
    """(labels (N,), number of classes) for class conditioning: dSprites conditions on shape."""
    if data.name not in NUM_CLASSES or data.labels is None:
        raise UserError(f"--prior-conditional needs class labels, which {data.name} does not "
                        f"have; it works with {', '.join(NUM_CLASSES)}")
    labels = data.labels[:, 1] if data.labels.dim() == 2 else data.labels
    return labels.long(), NUM_CLASSES[data.name]


@torch.no_grad()
def encode_all(model, images, batch_size, device, desc="encoding"):
    """Code grids (N, H, W) of a whole uint8 split, kept on the device as int16/int32."""
    dtype = torch.int16 if model.quantizer.num_codes <= 2 ** 15 else torch.int32
    model.eval()
    batches = utils.iterate(images, batch_size, device)
    codes = torch.cat([model.codes(x - 0.5).to(dtype) for x in progress.bar(
        batches, total=math.ceil(len(images) / batch_size), desc=desc, unit="batch")])
    model.train()
    return codes


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    # reference CIFAR-10 configuration (REFERENCE.md): batch 256, Adam lr 1e-3, codes of dim 64
    arguments.add_common_args(p, latent=64, lr=1e-3, batch_size=256, epochs=10,
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
    p.add_argument("--prior-epochs", type=arguments.nonneg_int, default=None,
                   help="epochs of the gated PixelCNN prior trained on the code grids once the "
                        f"VQ-VAE is trained; 0 = no prior and no samples (default: "
                        f"{sizes.PRIOR_EPOCHS}, or --epochs if fewer)")
    p.add_argument("--prior-max-steps", type=arguments.positive_int, default=None,
                   help="stop the prior after this many steps (default: --max-steps, so a "
                        "short run stays short in both phases)")
    p.add_argument("--prior-batch-size", type=arguments.positive_int, default=128,
                   help="code grids per prior step")
    p.add_argument("--prior-lr", type=arguments.positive_float, default=3e-4,
                   help="Adam learning rate of the prior")
    p.add_argument("--prior-channels", type=arguments.positive_int, default=128,
                   help="channels of the prior's stacks")
    p.add_argument("--prior-layers", type=arguments.positive_int, default=12,
                   help="gated layers of the prior")
    p.add_argument("--prior-kernel", type=arguments.positive_int, default=5,
                   help="odd kernel width of the prior's convolutions")
    p.add_argument("--prior-conditional", action="store_true",
                   help="condition the prior on the class label (dSprites: the shape)")
    return p.parse_args(argv)


def check_args(args):
    """What the flags' types cannot check alone (each number is checked as it is parsed)."""
    arguments.check_common_args(args, "vq_vae")
    if args.hidden % 2:
        raise UserError(f"--hidden must be even (the first layer has hidden/2 channels), "
                        f"got {args.hidden}")
    if args.prior_kernel % 2 == 0:
        raise UserError(f"--prior-kernel must be odd, got {args.prior_kernel}")
    if args.dataset == "celeba":
        grid_size(args.image_size)          # refused before anything is decoded
    epochs = sizes.prior_length(args.prior_epochs, args.prior_max_steps, args.epochs,
                                args.max_steps)[0]
    if args.prior_conditional and epochs > 0 and args.dataset not in NUM_CLASSES:
        raise UserError(f"--prior-conditional needs class labels, which {args.dataset} "
                              f"does not have; it works with {', '.join(NUM_CLASSES)}")
    return args


# Flags that a resumed run takes from its command line when typed; the rest come from
# checkpoint.pt. The prior's own settings (PRIOR_FLAGS) may be typed until prior.pt exists;
# from then on they come from prior.pt.
RESUME_FLAGS = ("epochs", "max_steps", "lr", "device", "out", "resume", "compile", "precision",
                "deterministic", "log_every", "eval_every", "eval_limit", "data_root",
                "prior_epochs", "prior_max_steps", "prior_lr")
PRIOR_FLAGS = ("prior_batch_size", "prior_channels", "prior_layers", "prior_kernel",
               "prior_conditional")


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
    variance = data_variance(images, images.device)
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
    run = loop.start_run(args, "vq_vae", RESUME_FLAGS + PRIOR_FLAGS,
                         {**checkpoints.RESUME_KEYS, "data": dict})
    dist = distributed.DIST
    model = build_model(args, run.train.channels).to(run.device)
    opt = devices.adam(model.parameters(), args.lr, run.device)
    batches = utils.DeviceBatches(run.train.images, args.batch_size, run.device, args.seed,
                                  rank=dist.rank, world=dist.world)
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
        describe=partial(describe, args.codes), scaler=scaler)

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
        metrics["prior"] = train_prior(args, model, run, trained.step)
        if dist.main:
            files.write_json(run.out / "metrics.json", {**metrics, "wall_time_s": timer()})
    distributed.cleanup()
    return metrics


def resume_prior(args, model, path, vq_step):
    """On --resume, prior.pt (checked like any checkpoint) and the run's flags with its prior
    settings (PRIOR_FLAGS come from prior.pt); else None and `args`. A prior trained on the
    codes of another VQ-VAE state is refused."""
    if not (args.resume and path.exists()):
        return None, args
    state = checkpoints.load(path)
    checkpoints.check_kind(state, path, "vq_vae_prior")
    checkpoints.check_resumable(state, path, {**checkpoints.RESUME_KEYS, "config": dict,
                                              "vq_step": int, "vqvae": dict})
    if state["vq_step"] != vq_step or any(
            not torch.equal(v.cpu(), state["vqvae"][k]) for k, v in model.state_dict().items()):
        raise UserError(
            f"{path} was trained on the codes of another VQ-VAE state (step "
            f"{state['vq_step']}; this run's is step {vq_step}); move {path} away to train "
            "a new prior")
    return state, checkpoints.resume_args(args, state, RESUME_FLAGS)


@torch.no_grad()
def held_out_bits(prior, codes, labels, batch_size, device, precision="fp32"):
    """Bits per code of the prior on held-out code grids (N, H, W) with their class `labels`
    (or None). Each rank scores its shard; the sums are added over ranks."""
    prior.eval()
    rank, world = distributed.DIST.rank, distributed.DIST.world
    grids = codes[rank::world]
    grid_labels = None if labels is None else labels[rank::world]
    nll = distributed.Sums(1, device)               # summed over grids
    for i in progress.bar(range(0, len(grids), batch_size), desc="prior evaluation",
                          unit="batch"):
        c = grids[i:i + batch_size].long()
        y = None if grid_labels is None else grid_labels[i:i + batch_size]
        with devices.autocast(device, precision):
            nll.add(prior_nll(prior, c, y).float()[None] * len(c))
    prior.train()
    return float(nll.read()[0]) / len(codes) / math.log(2)


def train_prior(args, model, run, vq_step):
    """Fit the gated PixelCNN to the training set's code grids, score held-out bits per code,
    write samples.png. Resumes from prior.pt with --resume (its length then follows the flags
    saved in prior.pt, or those typed). Under torchrun every rank encodes the grids and trains
    on its shard of each epoch's order with DistributedDataParallel; rank 0 alone writes and
    samples. Returns the prior's metrics; a stop by a signal raises console.Stopped once
    prior.pt is saved."""
    dist, device, grid = distributed.DIST, run.device, (grid_size(run.train.image_size),) * 2
    state, args = resume_prior(args, model, run.out / "prior.pt", vq_step)
    labels, num_classes = class_labels(run.train) if args.prior_conditional else (None, 0)
    config = state["config"] if state else prior_config(args, model.quantizer.num_codes, grid,
                                                       num_classes)
    prior = build_prior(config).to(device)
    opt = devices.adam(prior.parameters(), args.prior_lr, device)
    epochs, max_steps = sizes.prior_length(args.prior_epochs, args.prior_max_steps, args.epochs,
                                           args.max_steps)
    codes, labels, test_codes, test_labels = code_grids(
        model, run, labels, epochs, max_steps, args.prior_batch_size, args.batch_size,
        "eval_limit" in args.given)
    batches = utils.DeviceBatches(codes, args.prior_batch_size, device, args.seed,
                                  rank=dist.rank, world=dist.world)     # refuses < 1 batch
    # the prior's own precision: typed, prior.pt's, or auto (not the VQ-VAE's, in `args`)
    typed = "precision" in args.given
    precision, why = devices.choose_precision(args.precision if typed or state else "auto",
                                              device, resumed=bool(state) and not typed)
    scaler = devices.grad_scaler(device, precision)
    if dist.main:
        print(f"prior {why}")
    bits = partial(held_out_bits, prior, test_codes, test_labels, args.prior_batch_size, device,
                   precision)
    settings = loop.Settings(
        "vq_vae_prior", run.out, sizes.run_steps(len(batches), epochs, max_steps), len(batches),
        args.prior_batch_size * dist.world, args.prior_lr,
        {**vars(args), "precision": precision}, args.log_every,
        compile=args.compile, checkpoint="prior.pt", history="prior_history.json",
        saved={"config": config, "vq_step": vq_step, "vqvae": model.state_dict(),
               "data": {"channels": run.train.channels, "image_size": run.train.image_size}},
        reserve=(model,), shown={"bits_per_code": ".3f"}, desc="prior", items="code grids")
    trained = loop.train(
        prior, opt, lambda fwd, idx, step: prior_train_step(
            fwd, opt, codes[idx], None if labels is None else labels[idx], precision, scaler),
        batches.indices, settings, state, scaler=scaler,
        evaluate=lambda last: {"train_bits_per_code": last["bits_per_code"],
                               "test_bits_per_code": bits()},
        describe=lambda h: (f"prior epoch {h['epoch']} step {h['step']}: held-out "
                            f"{h['test_bits_per_code']:.4f} bits/code"))

    # the last epoch's score is the final one when it was taken at this step (the common case)
    history = trained.history
    final = history[-1]["test_bits_per_code"] if history and history[-1]["step"] == trained.step \
        else bits()
    if dist.main:
        save_prior_outputs(model, prior, grid, num_classes, trained.log, history, final, run.out,
                           args.seed, precision)
    return {"test_bits_per_code": final, "uniform_bits_per_code": math.log2(config["num_codes"]),
            "steps": trained.step, "epochs": trained.epochs, "train_time_s": trained.train_time,
            "config": config, "conditional": bool(args.prior_conditional),
            "precision": loop.precision_record(precision, why)}


def code_grids(model, run, labels, epochs, max_steps, prior_batch, batch_size, given):
    """The prior's data on the device: (training grids, their labels, held-out grids, their
    labels), the labels None for an unconditional prior. A prior limited to S steps draws at
    most S batches, so it encodes no more training grids than that; its held-out grids are
    sized to its training (`sizes.prior_held_out`) unless --eval-limit was `given`, and said."""
    world = distributed.DIST.world
    n = len(run.train) if max_steps is None else \
        min(len(run.train), max_steps * prior_batch * world)
    batch = prior_batch * world
    per_epoch = n // batch * batch                      # grids in an epoch of the prior, and all
    trained = sizes.run_steps(per_epoch, epochs, None if max_steps is None else max_steps * batch)
    m = sizes.prior_held_out(len(run.test), trained, per_epoch, given)
    if m < len(run.test) and distributed.DIST.main:
        print(f"prior evaluation: {m:,} of the {len(run.test):,} held-out code grids at every "
              f"prior epoch end and after it (sized to the prior's training; --eval-limit "
              "scores all)")
    codes = encode_all(model, run.train.images[:n], batch_size, run.device,
                       "encoding the training set for the prior")                # (n, H, W)
    test_codes = encode_all(model, run.test.images[:m], batch_size, run.device,
                            "encoding the held-out set for the prior")
    if labels is None:
        return codes, None, test_codes, None
    return (codes, labels[:n].to(run.device), test_codes,
            class_labels(run.test)[0][:m].to(run.device))


def save_prior_outputs(model, prior, grid, num_classes, log, history, bits, out, seed,
                       precision):
    """prior_losses.png, and samples.png: 64 samples, 8 per row; with a conditional prior (of
    `num_classes` classes) each row is one class."""
    utils.plot_curves({"train": ([r["step"] for r in log], [r["bits_per_code"] for r in log]),
                       "held-out": ([h["step"] for h in history],
                                    [h["test_bits_per_code"] for h in history])},
                      out / "prior_losses.png", title="PixelCNN prior (bits per code)")
    device = next(prior.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(64, device=device) // 8 % num_classes if num_classes else None
    prior.eval()
    with devices.autocast(device, precision):
        samples = model.decode_codes(sample_codes(prior, 64, grid, labels, gen))
    utils.save_grid(samples, out / "samples.png", nrow=8)
    print(f"prior: held-out {bits:.4f} bits per code "
          f"({math.log2(model.quantizer.num_codes):.1f} for a uniform prior); samples in "
          f"{out / 'samples.png'}")


if __name__ == "__main__":
    console.run_command(main, parse_args)
