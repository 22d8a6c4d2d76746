"""The gated PixelCNN prior of the VQ-VAE (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"), fitted to the code grids of a trained VQ-VAE as in
van den Oord et al. 2017, section 3.3: p(c) = prod_i p(c_i | c_<i [, class]) over the grid in
raster order. Ancestral sampling of a grid, then the VQ-VAE's decoder, gives new images.

vq_vae.py trains it after the VQ-VAE (`--prior-epochs`); this file holds the network, its
training (`train_prior`, resumable from prior.pt), its held-out bits per code and its samples.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from training import arguments, checkpoints, devices, distributed, loop, progress, sizes
from training.errors import UserError

NUM_CLASSES = {"mnist": 10, "cifar10": 10, "dsprites": utils.DSPRITES_SIZES[1]}  # dSprites: shape
# the prior's own settings: typed until prior.pt exists, from then on taken from prior.pt
PRIOR_FLAGS = ("prior_batch_size", "prior_channels", "prior_layers", "prior_kernel",
               "prior_conditional")


# ----------------------------------------------------------------------------------------------
# The network: gated layers with a vertical and a horizontal stack
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


def prior_config(args, num_codes, grid, num_classes, steps):
    """Everything needed to rebuild the prior; stored in prior.pt. Its channels and layers are
    --prior-channels and --prior-layers, or sized to the `steps` it trains
    (sizes.prior_network), and said."""
    channels, layers = sizes.prior_network(args.prior_channels, args.prior_layers, steps)
    if (channels, layers) != (args.prior_channels, args.prior_layers) and distributed.DIST.main:
        print(f"prior network: {channels} channels, {layers} gated layers (sized to its "
              f"{steps:,} steps; --prior-channels and --prior-layers set them)")
    return {"num_codes": num_codes, "channels": channels, "layers": layers,
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
def sample_codes(prior, n, grid, labels=None, generator=None, temperature=1.0):
    """Ancestral sampling in raster order, c_i ~ p(c_i | c_<i), each from the softmax of the
    logits divided by the temperature T (T = 1: the prior itself; T < 1 sharper). The prior is
    causal, so each row's vertical stack runs once, on rows 0..i, and each position only the
    horizontal stack on its own row (GatedPixelCNN.row_sampler): the work grows as h*w rows,
    not h^2*w."""
    device = next(prior.parameters()).device
    h, w = grid
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    with progress.bar(total=h * w, desc=f"sampling {n} code grids", unit="position") as bar:
        for i in range(h):
            logits_at = prior.row_sampler(codes, i, labels)
            for j in range(w):
                logits = logits_at(j).float() / temperature                       # (n, K)
                codes[:, i, j] = torch.multinomial(logits.softmax(1), 1,
                                                   generator=generator)[:, 0]
                bar.update(1)
    return codes


# ----------------------------------------------------------------------------------------------
# Flags and data
# ----------------------------------------------------------------------------------------------
def add_prior_args(p):
    """The prior's flags, on vq_vae.py's parser."""
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
    p.add_argument("--prior-channels", type=arguments.positive_int, default=None,
                   help="channels of the prior's stacks (default: "
                        f"{sizes.PRIOR_NETWORK[0]}; {sizes.PRIOR_SHORT[0]} for a prior of "
                        f"fewer than {sizes.PRIOR_FULL_STEPS:,} steps)")
    p.add_argument("--prior-layers", type=arguments.positive_int, default=None,
                   help=f"gated layers of the prior (default: {sizes.PRIOR_NETWORK[1]}; "
                        f"{sizes.PRIOR_SHORT[1]} for a prior of fewer than "
                        f"{sizes.PRIOR_FULL_STEPS:,} steps)")
    p.add_argument("--prior-kernel", type=arguments.positive_int, default=5,
                   help="odd kernel width of the prior's convolutions")
    p.add_argument("--prior-conditional", action="store_true",
                   help="condition the prior on the class label (dSprites: the shape)")


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
    codes = torch.cat([model.codes(x).to(dtype) for x in progress.bar(
        batches, total=math.ceil(len(images) / batch_size), desc=desc, unit="batch")])
    model.train()
    return codes


# ----------------------------------------------------------------------------------------------
# Training, evaluation and samples
# ----------------------------------------------------------------------------------------------
def resume_prior(args, model, path, vq_step, flags):
    """On --resume, prior.pt (checked like any checkpoint) and the run's flags with its prior
    settings (PRIOR_FLAGS come from prior.pt; the typed `flags` replace saved ones); else None
    and `args`. A prior trained on the codes of another VQ-VAE state is refused."""
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
    return state, checkpoints.resume_args(args, state, flags)


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


def train_prior(args, model, run, vq_step, grid, resume_flags):
    """Fit the gated PixelCNN to the training set's code grids (each `grid` (H, W)), score
    held-out bits per code, write samples.png. Resumes from prior.pt with --resume (its length
    then follows the flags saved in prior.pt, or those typed among `resume_flags`). Under
    torchrun every rank encodes the grids and trains on its shard of each epoch's order with
    DistributedDataParallel; rank 0 alone writes and samples. Returns the prior's metrics; a
    stop by a signal raises console.Stopped once prior.pt is saved."""
    dist, device = distributed.DIST, run.device
    state, args = resume_prior(args, model, run.out / "prior.pt", vq_step, resume_flags)
    labels, num_classes = class_labels(run.train) if args.prior_conditional else (None, 0)
    epochs, max_steps = sizes.prior_length(args.prior_epochs, args.prior_max_steps, args.epochs,
                                           args.max_steps)
    config = state["config"] if state else prior_config(
        args, model.quantizer.num_codes, grid, num_classes,
        prior_plan(len(run.train), epochs, max_steps, args.prior_batch_size)[2])
    prior = build_prior(config).to(device)
    opt = devices.adam(prior.parameters(), args.prior_lr, device)
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
        reserve=(model,), shown={"bits_per_code": ".3f"}, desc="prior", items="code grids",
        tensorboard=run.out / "prior" if args.tensorboard else None)
    trained = loop.train(
        prior, opt, lambda fwd, idx, step: prior_train_step(
            fwd, opt, codes[idx], None if labels is None else labels[idx], precision, scaler),
        batches.indices, settings, state, scaler=scaler,
        evaluate=lambda last: {"train_bits_per_code": last["bits_per_code"],
                               "test_bits_per_code": bits()},
        describe=lambda h: (f"prior epoch {h['epoch']} step {h['step']}: held-out "
                            f"{h['test_bits_per_code']:.4f} bits/code"),
        pictures=lambda entry, folder: save_samples(                # TensorBoard's images
            model, prior, grid, num_classes, folder / "samples.png", args.seed, precision))

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


def prior_plan(train_size, epochs, max_steps, prior_batch):
    """(grids the prior encodes, grids in one of its epochs, steps it trains) for `train_size`
    training grids. A prior limited to S steps draws at most S batches, so it encodes no more
    training grids than that."""
    batch = prior_batch * distributed.DIST.world                 # grids per step, all ranks
    n = train_size if max_steps is None else min(train_size, max_steps * batch)
    per_epoch = n // batch * batch                      # grids in an epoch of the prior, and all
    return n, per_epoch, sizes.run_steps(per_epoch // batch, epochs, max_steps)


def code_grids(model, run, labels, epochs, max_steps, prior_batch, batch_size, given):
    """The prior's data on the device: (training grids, their labels, held-out grids, their
    labels), the labels None for an unconditional prior, as many training grids as it can draw
    (`prior_plan`); its held-out grids are sized to its training (`sizes.prior_held_out`)
    unless --eval-limit was `given`, and said."""
    n, per_epoch, steps = prior_plan(len(run.train), epochs, max_steps, prior_batch)
    m = sizes.prior_held_out(len(run.test), steps * prior_batch * distributed.DIST.world,
                             per_epoch, given)
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


def save_samples(model, prior, grid, num_classes, path, seed, precision, n=16):
    """`n` samples of the prior, decoded (`sample_images`), 8 per row (with a conditional
    prior, each row one class): samples.png (64) and TensorBoard's images at every evaluation
    of the prior (16). The prior's training mode is left as it was."""
    device = next(prior.parameters()).device
    training = prior.training
    samples = sample_images(model, prior, n, grid, sample_labels(n, num_classes, device),
                            torch.Generator(device).manual_seed(seed), precision=precision)
    prior.train(training)
    utils.save_grid(samples, path, nrow=8)


def save_prior_outputs(model, prior, grid, num_classes, log, history, bits, out, seed,
                       precision):
    """prior_losses.png, and samples.png: 64 samples, 8 per row; with a conditional prior (of
    `num_classes` classes) each row is one class."""
    utils.plot_curves({"train": ([r["step"] for r in log], [r["bits_per_code"] for r in log]),
                       "held-out": ([h["step"] for h in history],
                                    [h["test_bits_per_code"] for h in history])},
                      out / "prior_losses.png", title="PixelCNN prior (bits per code)")
    save_samples(model, prior, grid, num_classes, out / "samples.png", seed, precision, n=64)
    print(f"prior: held-out {bits:.4f} bits per code "
          f"({math.log2(model.quantizer.num_codes):.1f} for a uniform prior); samples in "
          f"{out / 'samples.png'}")


def sample_labels(n, num_classes, device):
    """The classes of n samples of a conditional prior of `num_classes` classes: 8 of each
    class in turn, the rows of samples.png; None for an unconditional prior."""
    return torch.arange(n, device=device) // 8 % num_classes if num_classes else None


@torch.no_grad()
def sample_images(model, prior, n, grid, labels, generator, temperature=1.0, precision="fp32"):
    """n images in [0, 1]: code grids (`grid`, (H, W)) drawn from the prior at softmax
    `temperature` (`sample_codes`, with their class `labels` or None), decoded by the VQ-VAE
    `model`, the networks in autocast in `precision`. samples.png and trained.VQVAE.sample
    both draw through here, so the same seed gives the same images."""
    device = next(prior.parameters()).device
    prior.eval()
    with devices.autocast(device, precision):
        return model.decode_codes(sample_codes(prior, n, grid, labels, generator, temperature))
