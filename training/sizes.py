"""Defaults sized to the run's length, in one place. A flag whose right value depends on how
long the run trains defaults to a share of it: a 10-step check is not followed by minutes of
scoring, and a schedule fits inside the run that follows it. Each function says why."""

HELD_OUT = 10_000           # held-out images scored when the run is long enough
HELD_OUT_FLOOR = 1_000      # and never fewer: a score on fewer images is noise
IW_FLOOR = 100              # fewest held-out images of a sized IW-NLL
C_SHARE = 0.5               # beta_vae.py objective B: C reaches C_max after this share of the run
WARMUP_SHARE = 0.1          # beta_vae.py objectives H and TC: beta warms up over this share
PRIOR_EPOCHS = 10           # vq_vae.py: the prior's default length, for runs of as many epochs
PRIOR_NETWORK = (128, 12)   # vq_vae.py's prior: channels and gated layers of a full run
PRIOR_SHORT = (32, 4)       # and of a prior shorter than PRIOR_FULL_STEPS
PRIOR_FULL_STEPS = 1_000
CURVE_IMAGES = 256_000      # beta_vae.py on dSprites: a point of the MIG curve every this many


def run_steps(steps_per_epoch, epochs, max_steps=None):
    """The steps a phase trains: its epochs, cut to `max_steps` where given."""
    steps = steps_per_epoch * epochs
    return steps if max_steps is None else min(steps, max_steps)


def run_images(batch_size, epochs, max_steps, train_size, world=1):
    """(images the whole run trains on, images per epoch), from the flags and the data size."""
    per_epoch = train_size // world // batch_size
    steps = run_steps(per_epoch, epochs, max_steps)
    return steps * batch_size * world, per_epoch * batch_size * world


def held_out_size(limit, train_images, epoch_images, default=HELD_OUT, floor=HELD_OUT_FLOOR):
    """--eval-limit: as given; else the default, cut to one epoch of training and to the images
    the whole run trains on, but at least `floor`. Why: the scores run every epoch, so they
    should cost no more than the epoch they score; a 10-step run is not followed by minutes of
    evaluation."""
    if limit is not None:
        return limit
    return max(floor, min(default, epoch_images, train_images))


def mig_points(train_images, epoch_images):
    """beta_vae.py --mig-points on dSprites: the held-out set's size (`held_out_size`). Why: MIG
    is scored at every held-out evaluation too, at about the same cost per image."""
    return held_out_size(None, train_images, epoch_images)


def curve_steps(batch_size, world=1):
    """beta_vae.py --eval-every on dSprites when the MIG curve is on: a held-out evaluation (and
    a point of the curve) every CURVE_IMAGES training images. Why: the curves in
    docs/disentanglement.md have a point every 256,000 images whatever the batch, so a run with
    the defaults draws its curve at the same points (4,000 steps at batch 64, 500 at 512)."""
    return max(1, round(CURVE_IMAGES / (batch_size * world)))


def prior_held_out(held_out, train_grids, epoch_grids, given=False):
    """vq_vae.py's prior: how many of the VQ-VAE's `held_out` grids its bits per code are
    scored on: all when --eval-limit was `given`; else cut like `held_out_size` to one epoch of
    the prior's training and to the grids it trains on in all. Why: the prior is scored at
    every epoch end too, and a forward pass of the PixelCNN costs a third of a training step."""
    return held_out if given else min(held_out, held_out_size(None, train_grids, epoch_grids))


def iw_size(limit, held_out, train_images, k, floor=IW_FLOOR):
    """--iw-images: as given (at most the held-out set); else all held-out images when the run
    trained on at least K/3 times as many, else proportionally fewer, at least `floor`. Why: an
    IW-NLL costs K decoder passes per image and a training image about three, so the final
    score costs no more than the training did."""
    if limit is not None:
        return min(limit, held_out)
    return min(held_out, max(floor, 3 * train_images // max(k, 1)))


def capacity_steps(total_steps, published):
    """beta_vae.py --c-steps (objective B): C_SHARE of the run, at most the `published` steps.
    Why: over the published 100,000 steps, a shorter run would end with C far below C_max, its
    capacity never reached."""
    return max(1, min(published, round(C_SHARE * total_steps)))


def warmup_steps(total_steps):
    """beta_vae.py --beta-warmup (objectives H and TC): WARMUP_SHARE of the run. Why: a fixed
    warm-up would take all of a short run."""
    return round(WARMUP_SHARE * total_steps)


def prior_length(prior_epochs, prior_max_steps, epochs, max_steps):
    """vq_vae.py's prior: (epochs, step limit), --prior-epochs and --prior-max-steps where
    given, else bounded like the VQ-VAE itself by --epochs (at most PRIOR_EPOCHS) and
    --max-steps. Why: a short run stays short in both phases. Computed when needed, not
    stored, so a resumed run's typed --max-steps bounds its prior too."""
    epochs = prior_epochs if prior_epochs is not None else min(PRIOR_EPOCHS, epochs)
    return epochs, prior_max_steps if prior_max_steps is not None else max_steps


def prior_network(channels, layers, steps):
    """vq_vae.py's prior: (--prior-channels, --prior-layers) where given; else PRIOR_NETWORK
    for a prior of at least PRIOR_FULL_STEPS steps and PRIOR_SHORT for a shorter one. Why: a
    gated layer costs about 41 C^2 multiply-adds per code (C channels), so the full network's
    step costs about 48 of the small one's, and its evaluation and sampling as many; a prior
    this short is part of a check that the run works end to end, and a check stays short in
    every phase (a full run's prior is unchanged)."""
    short = steps < PRIOR_FULL_STEPS
    return (channels if channels is not None else (PRIOR_SHORT if short else PRIOR_NETWORK)[0],
            layers if layers is not None else (PRIOR_SHORT if short else PRIOR_NETWORK)[1])
