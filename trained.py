"""Use a trained model from Python: a checkpoint of any of the three models (standard_vae.py,
beta_vae.py, vq_vae.py), rebuilt from the args it carries, in eval mode on a chosen device.

    import trained
    vae = trained.load("runs/beta_vae_dsprites/checkpoint.pt")
    x = vae.preprocess(["a.png", "b.png"])        # (2, C, S, S) in [0, 1], as training saw them
    mu, logvar = vae.encode(x)                    # q(z|x) = N(mu, diag exp(logvar))
    x_hat = vae.decode(mu)                        # E[p(x|z)] in [0, 1]
    samples = vae.sample(16, temperature=0.8)     # z ~ N(0, T^2 I), decoded

The VQ-VAE (van den Oord et al. 2017) has the same methods on its discrete codes: `encode`
gives the code grid k (B, H, W) of nearest codebook entries, `decode` maps a grid to images,
and `sample` draws grids from the gated PixelCNN prior saved beside the checkpoint (prior.pt),
at softmax temperature T. use_model.py does all of this from the command line.
"""
import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import beta_vae
import image_folders
import pixelcnn_prior
import standard_vae
import utils
import vq_vae
from training import checkpoints, devices, sizes
from training.errors import CheckpointError, UserError

SCRIPTS = {"standard_vae": "standard_vae.py", "beta_vae": "beta_vae.py", "vq_vae": "vq_vae.py"}
SHOWN_NAMES = image_folders.SHOWN_NAMES        # files named in a one-line note


def load(checkpoint, device="cpu", precision="fp32"):
    """The model in `checkpoint` (its kind read from the file), in eval mode on `device` ("cpu",
    "cuda", "mps", "auto" or a torch.device), its networks run in autocast in `precision`
    ("fp32", "bf16", "fp16" or "auto": devices.auto_precision's rule). A VAE (standard_vae,
    beta_vae) or a VQVAE; `why` says how the precision was chosen."""
    path = Path(checkpoint)
    device = devices.get_device(device) if isinstance(device, str) and \
        device in ("auto", "cpu", "cuda", "mps") else torch.device(device)
    state = checkpoints.load(path)
    kind = state.get("kind")
    if kind == "vq_vae_prior":
        raise CheckpointError(f"{path} is the PixelCNN prior of a VQ-VAE run, not the VQ-VAE: "
                              f"load the checkpoint.pt beside it (its sample() reads this prior)")
    if kind not in SCRIPTS:
        raise CheckpointError(f"{path} holds a model of unknown kind {kind!r}; use a checkpoint "
                              f"written by {', '.join(SCRIPTS.values())}")
    precision, why = devices.choose_precision(precision, device)
    kind_class = VQVAE if kind == "vq_vae" else VAE
    return kind_class(network(state, path).to(device).eval(), state, path, device, precision,
                      why)


def network(state, path):
    """The network that a checkpoint's args and data describe, with its weights (on the CPU);
    one clear line when they are missing or do not fit."""
    kind = state.get("kind")
    try:
        args, data = argparse.Namespace(**state["args"]), state["data"]
        if kind == "vq_vae":
            model = vq_vae.build_model(args, data["channels"])
        else:
            build = beta_vae.build_model if kind == "beta_vae" else standard_vae.build_model
            model = build(args, data["channels"], data["image_size"])
    except UserError:               # a ValueError too, but already one clear line
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} lacks or garbles what rebuilds its model (args or "
                              f"data: {type(e).__name__} {str(e)[:100]}); use a checkpoint "
                              f"written by {SCRIPTS.get(kind, 'one of the training scripts')}"
                              ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model its args describe: "
                              f"{str(e).splitlines()[0]}") from None
    return model


# ----------------------------------------------------------------------------------------------
# Images from disk, as the run's training saw them
# ----------------------------------------------------------------------------------------------
@dataclass
class Images:
    """Image files read for a model: `pixels` (N, C, S, S) uint8, one row per readable file in
    `files`; `skipped` {file: why} of those that could not be read; `converted`, the files
    whose channels were converted (grey to RGB, or colour to grey) and how."""
    pixels: torch.Tensor
    files: list
    skipped: dict = field(default_factory=dict)
    converted: list = field(default_factory=list)
    conversion: str = ""

    def notes(self):
        """A line naming the skipped files and one naming the converted ones, where any are."""
        def named(names):
            return "; ".join(names[:SHOWN_NAMES]) + ("; ..." if len(names) > SHOWN_NAMES else "")
        lines = []
        if self.skipped:
            n = len(self.skipped)
            lines.append(f"skipped {n} unreadable file{'s' if n > 1 else ''}: "
                         + named([f"{f} ({why})" for f, why in self.skipped.items()]))
        if self.converted:
            n = len(self.converted)
            lines.append(f"converted {n} image{'s' if n > 1 else ''} {self.conversion}: "
                         + named(self.converted))
        return lines


def image_files(paths):
    """The image files that `paths` (files and folders, or one of them) name, in order: a
    folder gives its images sorted by path (hidden files left out), as a folder run lists them.
    A path that does not exist is one line naming it."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [p / f for f in image_folders.walk_images(p, p)]
        elif p.exists():
            found.append(p)
        else:
            raise UserError(f"{p} does not exist")
    return found


class Trained:
    """What the three kinds share: `network` (the module, in eval mode on `device`), the run's
    `args` and `kind`, and images read from disk as its training saw them (`preprocess`)."""

    def __init__(self, network, state, path, device, precision="fp32", why=""):
        self.network, self.path, self.kind = network, Path(path), state["kind"]
        self.args, self.step = dict(state["args"]), state.get("step")
        self.channels = state["data"]["channels"]
        self.image_size = state["data"]["image_size"]
        self.device, self.precision, self.why = torch.device(device), precision, why
        self.batch_size = 256               # images per forward pass in sample()

    def autocast(self):
        return devices.autocast(self.device, self.precision)

    def generator(self, seed=None):
        """A generator on the device seeded by `seed`, default the run's --seed: the one that
        drew the run's samples.png."""
        seed = self.args.get("seed", 0) if seed is None else seed
        return torch.Generator(self.device).manual_seed(int(seed))

    def preprocess(self, images):
        """Image files (a path, a folder, or a list of them) -> (N, C, S, S) floats in [0, 1]
        on the device, each exactly as this run's training read its images: the centre
        square resized to S (image_folders.decode_image, the path of --dataset folder), or
        CelebA's --crop centre crop then resize; EXIF orientation, alpha over white and 16-bit
        grey as there. A grey image given to an RGB model is made RGB, a colour image given to
        a grey model grey (ITU-R 601 luma), and both are said; unreadable files are skipped
        and named."""
        read = self.read(image_files(images))
        for line in read.notes():
            print(line)
        if not read.files:
            raise UserError(f"no readable image among {len(read.skipped)} file"
                            f"{'s' if len(read.skipped) != 1 else ''}")
        return self.as_input(read.pixels)

    def as_input(self, pixels):
        """uint8 (N, C, S, S) -> floats in [0, 1] on the device."""
        return pixels.to(self.device).float() / 255

    def read(self, files):
        """`Images` of the image files `files`, as `preprocess` reads them (nothing printed)."""
        rows, kept, skipped, converted = [], [], {}, []
        celeba = self.args.get("dataset") == "celeba"
        for f in files:
            pixels, why = self.read_celeba(f) if celeba else self.read_image(f)
            if pixels is None:
                skipped[str(f)] = why
                continue
            rows.append(pixels)
            kept.append(str(f))
            if why:
                converted.append(str(f))
        pixels = torch.from_numpy(np.stack(rows)) if rows else \
            torch.zeros(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        conversion = ("from grey to RGB (the grey value in R, G and B) for this 3-channel "
                      "model" if self.channels == 3 else
                      "from colour to grey (ITU-R 601 luma) for this 1-channel model")
        return Images(pixels, kept, skipped, converted, conversion)

    def read_image(self, path):
        """(C, S, S) uint8 and whether its channels were converted, or (None, why): the path
        of image folders (image_folders.decode_folder_chunk, which names what it skips)."""
        size = self.image_size
        rgb, bad = image_folders.decode_folder_chunk(([str(path)], size, 3))
        if bad:
            return None, bad[0]
        rgb = rgb[0]
        grey = bool((rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all())
        if self.channels == 3:
            return rgb, grey
        if grey:                                # as a folder of grey images is cached
            return rgb[:1], False
        return image_folders.decode_folder_chunk(([str(path)], size, 1))[0][0], True

    def read_celeba(self, path):
        """CelebA's own decoding (utils._decode_celeba): the run's --crop centre crop, then
        resized; a file it refuses is skipped with its reason."""
        out = utils._decode_celeba(([str(path)], self.args.get("crop", 148), self.image_size))
        if isinstance(out, str):
            return None, out.replace(f"cannot read image {path}: ", "").replace(f"{path} ", "")
        rgb = out[0]
        return rgb, bool((rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all())

    def check_images(self, x):
        """x as a float batch (B, C, S, S) on the device, or one line saying what it should be."""
        want = (self.channels, self.image_size, self.image_size)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != want \
                or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
            raise UserError(f"expected images (B, {', '.join(map(str, want))}) in [0, 1], got "
                            f"{got}; preprocess(paths) makes them from image files")
        return x.to(self.device).float()


def one_image(x):
    """An image (C, S, S) or a batch of one (1, C, S, S) as a batch of one."""
    if not torch.is_tensor(x) or x.dim() not in (3, 4) or (x.dim() == 4 and len(x) != 1):
        raise UserError("an interpolation endpoint is one image, (C, S, S) or (1, C, S, S)")
    return x.reshape(1, *x.shape[-3:])


def check_count(n):
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise UserError(f"the number of samples must be a positive integer, got {n!r}")


def check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise UserError(f"the temperature must be a positive number, got {temperature!r}")


def interpolation_weights(steps):
    """t_k = k / (K - 1) for k = 0..K-1: exactly 0 and 1 at the ends."""
    if not isinstance(steps, int) or steps < 2:
        raise UserError(f"an interpolation needs at least 2 steps, got {steps!r}")
    return torch.arange(steps, dtype=torch.float32) / (steps - 1)


def latent_path(a, b, steps, path="linear"):
    """K points from a to b (tensors of one shape), the first exactly a and the last exactly b.
    linear: (1 - t) a + t b. slerp: the great-circle path of White 2016 ("Sampling Generative
    Networks"), sin((1 - t) W) / sin W a + sin(t W) / sin W b with W the angle between a and
    b: under a Gaussian prior in many dimensions its points keep a norm typical of the prior,
    where the straight line passes nearer the origin than codes usually lie. (torch.lerp's
    a + t (b - a) is not exactly b at t = 1, hence the explicit form.)"""
    t = interpolation_weights(steps).to(a.device).view(-1, *[1] * a.dim())
    a, b = a.float(), b.float()
    if path == "linear":
        return (1 - t) * a + t * b
    if path != "slerp":
        raise UserError(f"unknown interpolation path {path!r}; use linear or slerp")
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if torch.sin(omega) < 1e-6:                  # (anti)parallel: the arc is not defined
        return (1 - t) * a + t * b
    return torch.sin((1 - t) * omega) / torch.sin(omega) * a + \
        torch.sin(t * omega) / torch.sin(omega) * b


# ----------------------------------------------------------------------------------------------
# The VAEs: standard_vae.py and beta_vae.py
# ----------------------------------------------------------------------------------------------
class VAE(Trained):
    """A VAE of standard_vae.py or beta_vae.py: q(z|x) = N(mu(x), diag sigma^2(x)), the prior
    p(z) = N(0, I), the decoder's mean E[p(x|z)] (Bernoulli probabilities or Gaussian mean)."""
    PATHS = ("linear", "slerp")
    SPACE = "their posterior means mu(A) and mu(B)"

    @property
    def latent(self):
        return self.network.latent

    @torch.no_grad()
    def encode(self, x):
        """q(z|x) of images x (B, C, S, S) in [0, 1]: its mean mu and log-variance
        log sigma^2, (B, D) each, in fp32."""
        with self.autocast():
            mu, logvar = self.network.encoder(self.check_images(x))
        return mu.float(), logvar.float()

    @torch.no_grad()
    def decode(self, z):
        """E[p(x|z)] of codes z (B, D): images (B, C, S, S) in [0, 1]."""
        with self.autocast():
            return self.network.mean_image(self.network.decoder(z.to(self.device).float()))

    def reconstruct(self, x):
        """decode(mu(x)): each image decoded from its posterior mean, as reconstructions.png."""
        return self.decode(self.encode(x)[0])

    def sample(self, n, temperature=1.0, seed=None, generator=None):
        """n images decoded from z ~ N(0, T^2 I) (standard_vae.prior_codes), drawn from
        `generator`, else from a generator seeded by `seed` (default: the run's --seed, so that
        sample(64) at T = 1 gives the run's samples.png); decoded `batch_size` at a time."""
        return torch.cat(list(self.samples(n, temperature, generator or self.generator(seed))))

    def samples(self, n, temperature, generator):
        """`sample` in batches of `batch_size` images, as they are decoded."""
        check_count(n)
        check_temperature(temperature)
        z = standard_vae.prior_codes(n, self.latent, generator, float(temperature))
        for batch in z.split(self.batch_size):
            yield self.decode(batch)

    def interpolate(self, a, b, steps=8, path="linear"):
        """`steps` images on the `path` (linear or slerp, `latent_path`) between the posterior
        means of images a and b (each (1, C, S, S) or (C, S, S)); the first is decode(mu(a)),
        the last decode(mu(b))."""
        mu = self.encode(torch.cat([one_image(x) for x in (a, b)]))[0]
        return self.decode(latent_path(mu[0], mu[1], steps, path))


# ----------------------------------------------------------------------------------------------
# The VQ-VAE and its PixelCNN prior
# ----------------------------------------------------------------------------------------------
class VQVAE(Trained):
    """A VQ-VAE of vq_vae.py: the encoder's outputs z_e(x) (B, D, H, W), each replaced by its
    nearest codebook entry; the codes k (B, H, W) are what it encodes, decodes and samples (from
    the PixelCNN prior, prior.pt beside the checkpoint)."""
    PATHS = ("linear",)
    SPACE = ("their encoder outputs z_e(A) and z_e(B) before quantisation, each point "
             "quantised, then decoded")

    def __init__(self, *args, **named):
        super().__init__(*args, **named)
        self._prior = self.prior_config = None

    @torch.no_grad()
    def encode(self, x):
        """The code grid k (B, H, W) of images x (B, C, S, S) in [0, 1]: the index of the
        codebook entry nearest to each encoder output."""
        with self.autocast():
            return self.network.codes(self.check_images(x))

    @torch.no_grad()
    def encoder_outputs(self, x):
        """z_e(x) (B, D, H, W), fp32: the encoder's outputs before quantisation."""
        with self.autocast():
            return self.network.encoder(vq_vae.centred(self.check_images(x))).float()

    @torch.no_grad()
    def quantize(self, z_e):
        """The code grid (B, H, W) of the codebook entries nearest to z_e (B, D, H, W)."""
        return self.network.quantize(z_e.to(self.device))

    @torch.no_grad()
    def decode(self, codes):
        """Code grids (B, H, W) -> images (B, C, S, S) in [0, 1]."""
        with self.autocast():
            return self.network.decode_codes(codes.to(self.device).long())

    def reconstruct(self, x):
        """decode(encode(x)): each image through its code grid, as reconstructions.png."""
        return self.decode(self.encode(x))

    @property
    def prior(self):
        """The PixelCNN prior (prior.pt beside the checkpoint), loaded once, checked to be the
        one fitted to this VQ-VAE's codes; a missing one says how to train it."""
        if self._prior is None:
            prior, self.prior_config = load_prior(self.path.with_name("prior.pt"),
                                                  self.network, self.step)
            self._prior = prior.to(self.device).eval()
        return self._prior

    def sample(self, n, temperature=1.0, seed=None, generator=None, labels=None):
        """n images decoded from code grids drawn from the PixelCNN prior at softmax
        temperature T (pixelcnn_prior.sample_images), from `generator`, else one seeded by
        `seed` (default: the run's --seed, so that sample(64) at T = 1 gives the run's
        samples.png). With a class-conditional prior, `labels` (n,) are the classes, default
        8 of each in turn, as in samples.png. Grids are drawn `batch_size` at a time: the same
        seed gives the same images for the same batch size."""
        return torch.cat(list(self.samples(n, temperature, generator or self.generator(seed),
                                           labels)))

    def samples(self, n, temperature, generator, labels=None):
        """`sample` in batches of `batch_size` images, as they are drawn."""
        check_count(n)
        check_temperature(temperature)
        prior = self.prior
        grid, classes = tuple(self.prior_config["grid"]), self.prior_config["num_classes"]
        if labels is None:
            labels = pixelcnn_prior.sample_labels(n, classes, self.device)
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            yield pixelcnn_prior.sample_images(
                self.network, prior, size, grid,
                None if labels is None else labels[start:start + size].to(self.device),
                generator, float(temperature), self.precision)

    def interpolate(self, a, b, steps=8, path="linear"):
        """`steps` images on the straight line between the encoder outputs z_e(a) and z_e(b)
        before quantisation, each point quantised, then decoded: the first is
        decode(encode(a)), the last decode(encode(b))."""
        if path != "linear":
            raise UserError(f"the VQ-VAE interpolates linearly between encoder outputs; "
                            f"--path {path} is for the VAEs' Gaussian latents")
        z = self.encoder_outputs(torch.cat([one_image(x) for x in (a, b)]))
        return self.decode(self.quantize(latent_path(z[0], z[1], steps, path)))


def load_prior(path, vqvae, step):
    """(the PixelCNN prior in prior.pt, its config), checked to have been fitted to the codes of
    `vqvae` (the VQ-VAE at `step`); one line naming the file and the command that trains it
    when it is missing or stale."""
    train = (f"python vq_vae.py --out {path.parent} --resume --prior-epochs "
             f"{sizes.PRIOR_EPOCHS}")
    if not path.exists():
        raise UserError(f"no PixelCNN prior at {path}: a VQ-VAE samples its codes from the "
                        f"prior that vq_vae.py fits after it; train it with `{train}`")
    state = checkpoints.load(path)
    checkpoints.check_kind(state, path, "vq_vae_prior")
    fitted = state.get("vqvae")
    if state.get("vq_step") != step or not isinstance(fitted, dict) or any(
            not torch.equal(v.cpu(), fitted.get(k, torch.empty(0)).cpu())
            for k, v in vqvae.state_dict().items()):
        raise CheckpointError(f"{path} was fitted to the codes of another VQ-VAE state (step "
                              f"{state.get('vq_step')}; this checkpoint's is step {step}): "
                              f"move it away and train a new one with `{train}`")
    try:
        config = state["config"]
        prior = pixelcnn_prior.build_prior(config)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} lacks or garbles its prior's config ({type(e).__name__} "
                              f"{str(e)[:100]})") from None
    checkpoints.load_state(prior, state["model"], "PixelCNN prior", path)
    return prior, config
