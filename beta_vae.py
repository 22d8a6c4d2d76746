"""beta-VAE: Higgins et al. 2017 (fixed beta) and Burgess et al. 2018 (capacity annealing).

Higgins et al. weight the KL of the VAE objective by beta > 1 to favour factorised latents:

    H:  loss = -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))                  (Higgins, eq. 4)

Burgess et al. instead hold the KL near a capacity C that rises linearly from 0 to C_max, so
the latents gain information one factor at a time:

    B:  loss = -E_q[log p(x|z)] + gamma * |KL(q(z|x) || p(z)) - C(step)|     (Burgess, eq. 8)

beta-TCVAE (Chen et al. 2018) splits the average KL into three parts and weights only the total
correlation, the part that measures dependence between the latents:

    TC: loss = -E_q[log p(x|z)] + I_q(z; n) + beta * TC(z) + sum_j KL(q(z_j) || p(z_j))
                                                                   (Chen et al., beta-TCVAE)

The encoder and decoder are those of the Standard VAE (standard_vae.py), sized as in Burgess et
al.: four 4x4 stride-2 convolutions of 32 channels, FC 256, FC 256, 2 x latent outputs.

    python beta_vae.py --dataset dsprites --latent 10 --epochs 30
"""
import math
import os

import torch

import disentanglement
import standard_vae as sv
import utils
from training import arguments, console, devices, distributed, files, loop, sizes
from training.errors import UserError

# Published settings (docs/papers.md): C_max per dataset in nats, raised over 100,000 steps
# (Burgess et al. 2018, section 4 and appendix A); beta = 4 for objective H (Higgins et al.
# 2017, dSprites) and 6 for TC (Chen et al. 2018).
C_MAX = {"dsprites": 25.0, "celeba": 50.0}
PUBLISHED_C_STEPS = 100_000
BETA = {"H": 4.0, "TC": 6.0}
# The objective a dataset's run defaults to follows what the run is for. dSprites measures
# disentanglement: beta-TCVAE (Chen et al. 2018), the objective whose seeds disentangled best in
# our runs (docs/disentanglement.md); --objective B gives Burgess et al.'s published setting.
# CelebA serves attribute arithmetic (the smile vector), which needs the reconstructions to keep
# small features such as a smile; objective H with beta 1 keeps them, where B's pressure on the
# KL drops them. A folder of one's own images defaults to H with beta 1 too, for the attribute
# vectors of its class folders and --labels.
DEFAULT_OBJECTIVE = {"celeba": ("H", 1.0), "dsprites": ("TC", 6.0), "folder": ("H", 1.0)}
DEFAULT_WHY = {"dsprites": "the recipe whose seeds disentangled best in docs/disentanglement.md",
               "celeba": "chosen for attribute vectors", "folder": "chosen for attribute vectors"}
# Adam's learning rate when --lr is not given: Chen et al. 2018 train beta-TCVAE at 1e-3;
# Burgess et al. (and Higgins et al.'s objective here) at 5e-4.
DEFAULT_LR = {"TC": 1e-3}
# A reconstruction learns small features late, so an attribute vector needs a run of at least
# this many steps; shorter runs of objective H on CelebA say so at their start.
ATTRIBUTE_STEPS = 4_000


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step, so evaluation cannot advance them and a resumed
# run continues them exactly.
# ----------------------------------------------------------------------------------------------
def capacity(step, c_max, c_steps):
    """C(step) = C_max * min(1, step / T): raised linearly from 0 to C_max over T steps."""
    return c_max * min(1.0, step / c_steps) if c_steps > 0 else c_max


def beta_at(step, beta, warmup):
    """Linear beta warm-up: 0 at step 0, the full beta from step `warmup` on."""
    return beta * min(1.0, step / warmup) if warmup > 0 else beta


def schedule_at(step, objective, beta, beta_warmup, c_max, c_steps, **loss_settings):
    """What the schedule sets at `step` (TensorBoard plots it beside the loss terms): objective
    B's capacity C, else the warmed-up beta (on H's KL, on TC's total correlation)."""
    if objective == "B":
        return {"capacity": capacity(step, c_max, c_steps)}
    return {"beta": beta_at(step, beta, beta_warmup)}


def resolve_schedule(args, total_steps):
    """Fill in the schedule flags that were not given from the run's length, then say what the
    schedule is, and warn when a given one cannot finish within the run. Returns the lines."""
    lines = []
    if "objective" not in getattr(args, "given", ()) and \
            DEFAULT_OBJECTIVE.get(args.dataset) == (args.objective, args.beta):
        lines.append(f"objective {args.objective} with beta {args.beta:g}: the default on "
                     f"{args.dataset}, {DEFAULT_WHY[args.dataset]}; --objective B is Burgess "
                     "et al.'s published setting")
    if args.objective == "B":
        how = "--c-steps"
        if args.c_steps is None:
            args.c_steps = sizes.capacity_steps(total_steps, PUBLISHED_C_STEPS)
            how = (f"{sizes.C_SHARE:.0%} of the run's {total_steps:,} steps, at most "
                   f"{PUBLISHED_C_STEPS:,}; --c-steps sets it")
        lines.append(f"schedule: C rises linearly from 0 to {args.c_max:g} nats over "
                     f"{args.c_steps:,} steps ({how}), gamma {args.gamma:g}")
        reached = capacity(total_steps, args.c_max, args.c_steps)
        if reached < args.c_max:
            lines.append(f"warning: C will reach only {reached:.2f} of its {args.c_max:g} nats "
                         f"({reached / args.c_max:.0%}) in {total_steps:,} steps, so the model "
                         "stays below its capacity: lower --c-steps or train longer")
    else:
        how = "--beta-warmup"
        if args.beta_warmup is None:
            args.beta_warmup = sizes.warmup_steps(total_steps)
            how = (f"{sizes.WARMUP_SHARE:.0%} of the run's {total_steps:,} steps; "
                   "--beta-warmup sets it")
        weighted = "KL" if args.objective == "H" else "total correlation"
        lines.append(f"schedule: beta on the {weighted} rises linearly from 0 to {args.beta:g} "
                     f"over {args.beta_warmup:,} steps ({how})")
        if args.beta_warmup > total_steps:
            lines.append(f"warning: beta will reach {total_steps / args.beta_warmup:.2f} of "
                         f"{args.beta:g} in {total_steps:,} steps (lower --beta-warmup)")
    if args.dataset == "celeba" and args.objective == "H" and total_steps < ATTRIBUTE_STEPS:
        longer = (f"--max-steps {ATTRIBUTE_STEPS}" if args.max_steps is not None else
                  f"--epochs {math.ceil(args.epochs * ATTRIBUTE_STEPS / total_steps)}")
        lines.append(f"note: {total_steps:,} steps are few for attribute vectors: small "
                     "features such as a smile are learnt late (on 3,000 faces the Smiling "
                     "vector added 9% of the smile after 1,110 steps, 95% after 4,440); for "
                     f"them train at least {ATTRIBUTE_STEPS:,} steps ({longer})")
    return lines


def log_normal(z, mu, logvar):
    """log N(z; mu, exp(logvar)), elementwise."""
    return -0.5 * (sv.LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def aggregate_log_weights(batch, data_size, estimator, device="cpu"):
    """log w (B, B): q(z) = sum_n q(z|n) / N is estimated on a minibatch as sum_j w_ij q(z|x_j).

    mws, the minibatch-weighted sampling of Chen et al. 2018: every w_ij = 1 / (N B).
    mss, stratified: the image's own density is exactly one of the N terms (w_ii = 1 / N), and
    each of the B - 1 other images stands for (N - 1) / (B - 1) of the rest, so
    w_ij = (N - 1) / (N (B - 1)). The estimate of q(z_i) is unbiased, and exact when the
    batch is the whole data set. These are the weights of the stratified sampling in Chen et
    al.'s appendix; the matrix in their reference code does not hold them (an indexing problem,
    rtqichen/beta-tcvae pull request 1), so our mss deliberately differs from that code.
    Either estimator's -log N shared by every weight (mws: -log(N B)) is a constant: it shifts
    MI, TC and the dimension-wise KL but no gradient.
    """
    n = float(data_size)
    if estimator == "mws":
        return torch.full((batch, batch), -math.log(n * batch), device=device)
    others = math.log(n - 1) - math.log(n * (batch - 1)) if batch > 1 else -math.inf
    log_w = torch.full((batch, batch), others, device=device)
    log_w.fill_diagonal_(-math.log(n))
    return log_w


def tc_decomposition(z, mu, logvar, data_size, estimator="mss"):
    """The average KL split as in Chen et al. 2018, estimated on one minibatch:

        E_n KL(q(z|n) || p(z)) = I_q(z; n)          index-code mutual information
                               + KL(q(z) || prod_j q(z_j))          total correlation
                               + sum_j KL(q(z_j) || p(z_j))         dimension-wise KL

    `z` (B, D) holds one sample of each image's q(z|x); q(z) and the marginals q(z_j) are
    estimated from the whole batch (`aggregate_log_weights`). Returns the three batch means.
    The three always add up to the batch mean of log q(z|x) - log p(z).
    """
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    log_q_pairs = log_normal(z[:, None], mu[None], logvar[None])     # (B, B, D): z_i | x_j
    log_w = aggregate_log_weights(len(z), data_size, estimator, z.device)   # made on the device
    log_q_own = log_q_pairs.diagonal().sum(0)                         # (B,): log q(z_i|x_i)
    log_qz = torch.logsumexp(log_w + log_q_pairs.sum(2), 1)          # (B,): log q(z_i)
    log_qzj = torch.logsumexp(log_w[..., None] + log_q_pairs, 1)      # (B, D): log q(z_ij)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return {"mi": (log_q_own - log_qz).mean(), "tc": (log_qz - log_qzj.sum(1)).mean(),
            "dim_kl": (log_qzj.sum(1) - log_pz).mean()}


# the flags that set the objective: beta_vae_loss's keyword arguments
LOSS_FLAGS = ("objective", "recon", "beta", "beta_warmup", "gamma", "c_max", "c_steps",
              "tc_estimator")


def objective_settings(args, data_size):
    """beta_vae_loss's settings from the flags (schedules resolved), and the training set's
    size `data_size`, which objective TC's estimate of q(z) needs."""
    return {**{k: getattr(args, k) for k in LOSS_FLAGS}, "data_size": data_size}


def beta_vae_loss(x, logits, mu, logvar, step, objective, recon="bce", beta=4.0, beta_warmup=0,
                  gamma=1000.0, c_max=25.0, c_steps=PUBLISHED_C_STEPS, tc_estimator="mss",
                  log_sigma=None, data_size=None):
    """The objective (H, B or TC) at `step`, with the named terms (all fp32, nats). `beta` and
    `beta_warmup` weight H's KL and TC's total correlation; `gamma`, `c_max` and `c_steps` make
    B's capacity term; `data_size` (training images) and `tc_estimator` serve TC's estimate of
    the aggregate posterior."""
    nll = -sv.log_likelihood(x, logits, recon, log_sigma).mean()         # -E_q[log p(x|z)]
    kl_dims = sv.gaussian_kl(mu.float(), logvar.float()).mean(0)          # (latent,)
    kl = kl_dims.sum()
    terms = {}
    c = 0.0
    if objective == "H":
        weight = beta_at(step, beta, beta_warmup)
        loss = nll + weight * kl                                           # Higgins, eq. 4
    elif objective == "B":
        weight = gamma
        c = capacity(step, c_max, c_steps)
        loss = nll + gamma * (kl - c).abs()                                # Burgess, eq. 8
    else:
        # a reparameterised sample of its own: any sample of q(z|x) is an unbiased estimate
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        terms = tc_decomposition(z, mu, logvar, data_size, tc_estimator)
        weight = beta_at(step, beta, beta_warmup)
        loss = nll + terms["mi"] + weight * terms["tc"] + terms["dim_kl"]  # beta-TCVAE
    return {"loss": loss, "recon": nll, "kl": kl, "kl_dims": kl_dims,
            "capacity": c, "beta": weight, **terms}


# ----------------------------------------------------------------------------------------------
# Latent traversals
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def latent_traversal(model, x, dims, span=3.0, steps=7):
    """Decode each seed's posterior mean with one latent swept over [-span, span].

    Returns (len(dims), seeds * steps, C, H, W): one row per latent dimension in `dims`.
    """
    was_training = model.training
    model.eval()
    mu, _ = model.encoder(x)                                               # (S, D)
    z = mu[None, :, None, :].repeat(len(dims), 1, steps, 1)                # (R, S, T, D)
    sweep = torch.linspace(-span, span, steps, device=mu.device)
    for row, d in enumerate(dims):
        z[row, :, :, d] = sweep
    images = model.mean_image(model.decoder(z.flatten(0, 2)))              # (R*S*T, C, H, W)
    model.train(was_training)
    return images.view(len(dims), len(x) * steps, *images.shape[1:])


def save_traversal(model, images, kl_per_dim, path, seeds=3, steps=7, span=3.0, rows=None,
                   names=None, gif=None):
    """traversal.png: one row per latent, ordered by KL (largest first), KL printed beside it
    and, if `names` (latent -> text) is given, what the latent encodes; `rows` keeps only that
    many latents (the most informative). With `gif` (a path), also an animation with one frame
    per traversal step: each latent's row shows the seed images at that step."""
    device = next(model.parameters()).device
    x = images[:seeds].to(device).float() / 255
    kl = torch.as_tensor(kl_per_dim)
    order = torch.argsort(kl, descending=True).tolist()[:rows]
    grid = latent_traversal(model, x, order, span, steps)         # (rows, seeds * steps, ...)
    labels = [f"z{d:<2d} KL {kl[d]:5.2f} {(names or {}).get(d, '')}".rstrip() for d in order]
    utils.save_labelled_rows(grid, labels, path, gap_every=steps)
    if gif is not None:
        frames = grid.view(len(order), len(x), steps, *grid.shape[2:]).permute(2, 0, 1, 3, 4, 5)
        utils.save_labelled_gif(frames, labels, gif)               # (steps, rows, seeds, ...)
    return order


def plot_kl_per_dim(log, path, args, informative=0.5, ax=None):
    """kl_per_dim.png (or a panel `ax`): each latent's KL, the total and C over training.

    Latents ending above `informative` nats get a colour and a legend entry, largest first; the
    rest are thin grey lines under one entry, so 32 latents stay readable.
    """
    steps = [r["step"] for r in log]
    final = log[-1]["kl_dims"]
    order = sorted(range(len(final)), key=lambda d: -final[d])
    quiet = [d for d in order if final[d] < informative]
    curves, styles = {}, {}
    for rank, d in enumerate(order):                 # informative latents come first
        curves[f"z{d}"] = (steps, [r["kl_dims"][d] for r in log])
        if d not in quiet:
            styles[f"z{d}"] = {"color": f"C{rank % 10}"}
        else:                                        # one legend entry for all quiet latents
            styles[f"z{d}"] = {"color": "0.6", "linewidth": 0.8, "label":
                               f"{len(quiet)} latents < {informative} nat" if d == quiet[0]
                               else None}
    curves["total KL"] = (steps, [r["kl"] for r in log])
    styles["total KL"] = {"color": "black", "linewidth": 2}
    if args.objective == "B":
        curves["capacity C"] = (steps, [capacity(s, args.c_max, args.c_steps) for s in steps])
        styles["capacity C"] = {"color": "black", "linestyle": "--", "linewidth": 1}
    utils.plot_curves(curves, path, xlabel="step", styles=styles, ax=ax, legend="upper left",
                      title=f"KL per latent dimension (nats), {len(final)} latents")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    arguments.add_common_args(p, utils.DATASETS, latent=10, lr=5e-4, batch_size=64, epochs=30,
                              dataset="celeba", lr_help="Adam learning rate (1e-3 with "
                              "objective TC, as Chen et al. 2018)")
    p.add_argument("--objective", default=None, choices=("H", "B", "TC"),
                   help="H: recon + beta*KL (Higgins); B: recon + gamma*|KL - C| (Burgess); "
                        "TC: recon + MI + beta*TC + dimension-wise KL (Chen, beta-TCVAE) "
                        "(default: TC with beta 6 on dsprites, the recipe that disentangled "
                        "best in docs/disentanglement.md; H with beta 1 on celeba, for "
                        "attribute vectors; else B)")
    p.add_argument("--beta", type=arguments.nonneg_float, default=None,
                   help="beta of objective H (default 4; 1 when celeba defaults to H) or TC "
                        "(default 6)")
    p.add_argument("--beta-warmup", type=arguments.nonneg_int, default=None,
                   help="steps of linear beta warm-up from 0, objectives H and TC (default: "
                        f"{sizes.WARMUP_SHARE:.0%}% of the run; 0 = none)")
    p.add_argument("--tc-estimator", default="mss", choices=("mss", "mws"),
                   help="objective TC: estimate q(z) on the minibatch by stratified (mss) or "
                        "minibatch-weighted (mws) sampling")
    p.add_argument("--gamma", type=arguments.nonneg_float, default=1000.0,
                   help="gamma of objective B")
    p.add_argument("--c-max", type=arguments.nonneg_float, default=None,
                   help="final capacity in nats (default: 25 on dsprites, 50 on celeba, "
                        "else 25)")
    p.add_argument("--c-steps", type=arguments.nonneg_int, default=None,
                   help="steps over which C rises linearly from 0 to --c-max (default: "
                        f"{sizes.C_SHARE:.0%}% of the run, at most the published "
                        f"{PUBLISHED_C_STEPS:,})")
    p.add_argument("--mig-points", type=arguments.nonneg_int, default=None,
                   help="dsprites: MIG on this many images at every held-out evaluation, "
                        "a curve of disentanglement in history.json (default: 10,000, or the "
                        "images the run trains on if fewer, at least 1,000; 0 = off); while it is on, "
                        "--eval-every defaults to a point every 256,000 images")
    sv.add_vae_args(p, iw_samples=0)
    return p.parse_args(argv)


def check_args(args):
    arguments.check_common_args(args, "beta_vae")
    sv.check_vae_args(args)
    if args.c_max is None:
        args.c_max = C_MAX.get(args.dataset, 25.0)
    if args.objective is None:
        args.objective, beta = DEFAULT_OBJECTIVE.get(args.dataset, ("B", None))
        if args.beta is None and beta is not None:
            args.beta = beta
    if args.beta is None:
        args.beta = BETA.get(args.objective, BETA["H"])
    if "lr" not in args.given:
        args.lr = DEFAULT_LR.get(args.objective, args.lr)
    if args.mig_points is None:           # sized to the run, as the held-out set is
        train = min(args.limit or math.inf, len(utils.dsprites_split("train")))
        args.mig_points = 0 if args.dataset != "dsprites" else sizes.mig_points(
            *sizes.run_images(args.batch_size, args.epochs, args.max_steps, train))
    if args.mig_points and args.eval_every is None:     # the curve's points, as in the README
        args.eval_every = sizes.curve_steps(args.batch_size,
                                             int(os.environ.get("WORLD_SIZE", 1)))
    if args.objective == "TC" and args.batch_size < 2:
        raise UserError("--objective TC estimates q(z) on the batch: --batch-size >= 2")
    return args


def build_model(args, channels, image_size):
    """The Burgess et al. architecture: 32 channels in every conv layer, FC `hidden`."""
    n_convs = len(sv.default_widths(image_size))
    return sv.VAE(channels, image_size, args.latent, [32] * n_convs, args.hidden, args.recon,
                  args.sigma, getattr(args, "arch", "conv"))     # checkpoints before --arch


# the terms logged, of those the objective returns (mi, tc and dim_kl: TC only)
LOGGED = ("loss", "recon", "kl", "kl_dims", "mi", "tc", "dim_kl")


def train_step(model, opt, x, step, objective, log_sigma, precision="fp32",
               scaler=devices.NO_SCALER):
    """One optimiser step on a batch x (B, C, S, S) in [0, 1]: the forward pass (in autocast in
    `precision`), the objective's terms at `step` in fp32 (`objective`: beta_vae_loss's
    settings), backward, Adam; with fp16, `scaler` (devices.grad_scaler) scales the loss.
    `model` is the VAE or its DDP/compiled wrapper, which does not expose the decoder's
    `log_sigma`: it is handed in. Returns the (device) terms."""
    with devices.autocast(x.device, precision):
        logits, mu, logvar = model(x)                         # (B, C, S, S), (B, D), (B, D)
    terms = beta_vae_loss(x, logits, mu, logvar, step=step, **objective, log_sigma=log_sigma)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()          # times the fp16 loss scale (else as is)
    scaler.step(opt)                                # skipped if a scaled gradient overflowed
    scaler.update()
    return terms


def mig_scores(model, data_root, seed, points):
    """MIG on `points` dSprites images: a curve of disentanglement in the history."""
    device = next(model.parameters()).device
    return disentanglement.mig_only(model, data_root, device, seed, points)    # in fp32


def main(args):
    timer = console.Timer()
    args = check_args(args)
    run = loop.start_run(args, "beta_vae", sv.RESUME_FLAGS, utils.load_split)
    model, opt, batches = sv.setup(build_model(args, run.train.channels, run.train.image_size),
                                   run.device, run.train, args.lr, args.batch_size, args.seed,
                                   data_on=args.data_on)
    settings = loop.Settings.from_args(args, "beta_vae", run, len(batches), logged=LOGGED,
                                       shown=sv.SHOWN)
    lines = resolve_schedule(args, settings.steps)          # fills in --c-steps / --beta-warmup
    objective = objective_settings(args, len(run.train))
    if distributed.DIST.main:
        print("\n".join(lines))
    scaler = devices.grad_scaler(run.device, run.precision)
    mig_points = args.mig_points if args.dataset == "dsprites" else 0     # a MIG curve: dSprites

    def score(**iw):                          # the held-out bound (iw: the final IW-NLL's size)
        return sv.evaluate(model, run.test.images, run.device, args.seed, binarize=False,
                           binary=run.test.binary, precision=run.precision, **iw)

    def evaluate(last):                       # every evaluation: the bound, and MIG on dSprites
        scores = sv.epoch_scores(score(), last)
        return {**scores, **(mig_scores(model, args.data_root, args.seed, mig_points)
                             if mig_points else {})}

    def pictures(entry, folder):              # TensorBoard's images at every evaluation
        sv.save_images(model, run.test.images, folder, run.device, args.seed, n=8, samples=16)
        save_traversal(model, run.test.images, entry["kl_per_dim"], folder / "traversal.png",
                       seeds=1)

    trained = loop.train(
        model, opt, lambda fwd, x, step: train_step(fwd, opt, x, step, objective,
                                                    model.log_sigma, run.precision, scaler),
        batches.epoch, settings, run.state, evaluate=evaluate, scaler=scaler,
        pictures=pictures, schedule=lambda step: schedule_at(step, **objective))

    final = sv.final_evaluation(score, len(run.test), trained.step * settings.batch,
                                args.iw_samples, args.iw_images)
    c = capacity(trained.step, args.c_max, args.c_steps) if args.objective == "B" else None
    metrics = None
    if distributed.DIST.main:
        sv.save_images(model, run.test.images, run.out, run.device, args.seed)
        sv.plot_history(trained.log, trained.history, run.out)
        plot_kl_per_dim(trained.log, run.out / "kl_per_dim.png", args)
        order = save_traversal(model, run.test.images, final["kl_per_dim"],
                               run.out / "traversal.png")
        metrics = {"test": final, **loop.summary(trained, run), "capacity": c,
                   "latents_by_kl": order, "wall_time_s": timer(), "args": vars(args)}
        files.write_json(run.out / "metrics.json", metrics)
        print(f"held-out -ELBO {final['neg_elbo']:.2f} nats, KL {final['kl']:.2f}; active "
              f"units {final['active_units']}/{args.latent}; outputs in {run.out}")
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    console.run_command(main, parse_args)
