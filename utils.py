"""What every script shares about data: the dataset readers and caches, their batches on the
device, image grids and plots. No model, loss or run machinery lives here (that is training/).

The sections, in the order a reader needs them:
- images and plots;
- data loading: `load_dataset`, the batches (`DeviceBatches`, or `HostBatches` for a split
  too large for the device, chosen by `training_batches`), then MNIST, CIFAR-10, CelebA and
  dSprites; a folder of your own images is read by image_folders.py;
- dataset synthesis: the dSprites renderer and the CelebA decoding cache (built by
  image_folders.build_image_cache, as a folder's is).
"""
import gzip
import itertools
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

import image_folders
from training import distributed, progress
from training.errors import DatasetNotFound, UserError
from training.files import atomic_write, building, replacing

DATASETS = ("mnist", "cifar10", "celeba", "dsprites", "folder")
ATTRIBUTE_DATASETS = ("celeba", "folder")       # their labels are binary attributes, 1 or 0


# ==============================================================================================
# IMAGES AND PLOTS
# ==============================================================================================
def save_grid(images, path, nrow=8, padding=2):
    """Save a (N, C, H, W) float batch in [0, 1] as one PNG grid."""
    atomic_write(path, lambda f: torchvision.utils.save_image(
        images.detach().float().clamp(0, 1).cpu(), f, format="png", nrow=nrow, padding=padding,
        pad_value=0.5))


@torch.no_grad()
def save_reconstructions(images, reconstruct, path, device, n=32):
    """Originals above their reconstructions, 8 per row (fewer if fewer images): the first
    `n` of uint8 `images` (N, C, H, W) and `reconstruct(x)` of them, x in [0, 1] on `device`,
    each returning images in [0, 1]."""
    cols = min(8, n, len(images))
    x = images[:min(n, len(images)) // cols * cols].to(device).float() / 255
    recon = reconstruct(x)
    pairs = torch.stack([x.view(-1, cols, *x.shape[1:]), recon.view(-1, cols, *x.shape[1:])], 1)
    save_grid(pairs.flatten(0, 2), path, nrow=cols)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_figure(rows=1, cols=1, panel=(6, 4)):
    """A figure of rows x cols panels, each `panel` inches; returns (fig, 2-D array of axes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows),
                             squeeze=False)
    return fig, axes


def save_figure(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _pyplot().close(fig)


def plot_curves(curves, path=None, xlabel="step", title=None, logy=False, styles=None, ax=None,
                legend="best"):
    """Plot named series {name: (xs, ys)} on one axis: saved to `path`, or drawn into `ax`.

    `styles` maps a name to extra matplotlib line options (colour, width, dashes); a style with
    label=None keeps that series out of the legend. `legend` is its location; more than eight
    entries go in two columns.
    """
    fig = None
    if ax is None:
        fig, axes = plot_figure()
        ax = axes[0, 0]
    styles = styles or {}
    for name, (xs, ys) in curves.items():
        style = {"label": name, "marker": "o" if len(xs) < 30 else None, "markersize": 3,
                 **styles.get(name, {})}
        ax.plot(xs, ys, **style)
    ax.set_xlabel(xlabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize="small", loc=legend, ncol=2 if entries > 8 else 1)
    if fig is not None:
        save_figure(fig, path)


def plot_bars(values, path=None, xlabel="latent dimension", ylabel="KL (nats)", title=None,
              labels=None, ax=None):
    """Bar chart of `values` (tick `labels` default to the indices): saved to `path` or drawn
    into `ax`."""
    values = [float(v) for v in values]
    fig = None
    if ax is None:
        fig, axes = plot_figure(panel=(max(4, 0.3 * len(values) + 2), 3.5))
        ax = axes[0, 0]
    ax.bar(range(len(values)), values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels is not None:
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize="small")
    elif len(values) <= 32:
        ax.set_xticks(range(len(values)))
    if fig is not None:
        save_figure(fig, path)


def labelled_rows_figure(images, labels, gap_every=None):
    """A matplotlib figure of a (rows, cols, C, H, W) float batch in [0, 1] as a grid with one
    text label per row, one output pixel per image pixel. `gap_every` puts a wider gap after
    every that many columns (to separate seed images)."""
    plt = _pyplot()
    rows, cols = images.shape[:2]
    grid = torchvision.utils.make_grid(images.flatten(0, 1).detach().float().clamp(0, 1).cpu(),
                                       nrow=cols, padding=2, pad_value=1.0)   # (3, H', W')
    pixels = grid.permute(1, 2, 0).numpy()
    if gap_every:
        w = images.shape[-1] + 2
        blocks = [pixels[:, i * w:(i + gap_every) * w] for i in range(0, cols, gap_every)]
        sep = np.ones((pixels.shape[0], 6, 3), pixels.dtype)
        pixels = np.concatenate(sum(([b, sep] for b in blocks), [])[:-1], axis=1)
    height, width = pixels.shape[:2]
    dpi = 100
    label_w = max(110, 8 * max(map(len, labels), default=0) + 12)   # monospace 9 pt: ~7.5 px
    fig = plt.figure(figsize=((width + label_w) / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes([label_w / (width + label_w), 0, width / (width + label_w), 1])
    ax.imshow(pixels, interpolation="nearest")
    ax.axis("off")
    row_h = height / rows
    for r, text in enumerate(labels):
        fig.text(label_w / (width + label_w) - 0.005, 1 - (r + 0.5) * row_h / height, text,
                 ha="right", va="center", fontsize=9, family="monospace")
    return fig


def save_labelled_rows(images, labels, path, gap_every=None):
    """Save a (rows, cols, C, H, W) float batch in [0, 1] as a PNG grid with one text label per
    row (`labelled_rows_figure`)."""
    fig = labelled_rows_figure(images, labels, gap_every)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    _pyplot().close(fig)


def save_labelled_gif(frames, labels, path, frame_ms=150):
    """An animated GIF of (frames, rows, cols, C, H, W) floats in [0, 1], each frame a labelled
    grid (`labelled_rows_figure`), played forwards then backwards, looping."""
    from PIL import Image
    plt = _pyplot()
    pictures = []
    for grid in frames:
        fig = labelled_rows_figure(grid, labels)
        fig.canvas.draw()
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(fig)
    loop = pictures + pictures[-2:0:-1]                # there and back again
    atomic_write(path, lambda f: loop[0].save(f, format="GIF", save_all=True,
                                              append_images=loop[1:], duration=frame_ms,
                                              loop=0))


# ==============================================================================================
# DATA LOADING: every dataset becomes a uint8 (N, C, H, W) tensor plus its labels
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Splits in memory and their batches
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """A whole split in memory. `images` is uint8 (N, C, H, W), 255 = white."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None          # (N,) class or (N, F) factor classes
    label_names: list = field(default_factory=list)
    binary: bool = False                        # pixels are exactly 0 or 255
    files: list = field(default_factory=list)   # file names, where the images have them
    value_names: dict = field(default_factory=dict)   # {label: names of its classes}
    mapped: bool = False                        # `images` is a view of a memory-mapped cache

    def __len__(self):
        return self.images.shape[0]

    @property
    def image_size(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]


def load_dataset(name, root, split, limit=None, image_size=64, crop=148, channels=None,
                 labels=None, cache_dir=None, val_fraction=0.1):
    """Load `split` ('train', 'test'; CelebA also 'valid') of a dataset as an ImageSet. The
    last four options are those of a folder of images (image_folders.load_folder)."""
    if split not in ("train", "valid", "test"):
        raise UserError(f"unknown split {split!r}; use 'train', 'valid' or 'test'")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if name == "celeba":
        data = load_celeba(Path(root), split, limit, image_size, crop)
    elif name == "folder":
        images, attributes, names, files = image_folders.load_folder(
            Path(root), split, limit, image_size, channels, labels, cache_dir, val_fraction)
        data = ImageSet("folder", images, attributes, names, files=files, mapped=True)
    elif name in ("mnist", "cifar10", "dsprites"):
        if split == "valid":
            raise UserError(f"{name} has no validation split; use 'train' or 'test'")
        loader = {"mnist": load_mnist, "cifar10": load_cifar10, "dsprites": load_dsprites}[name]
        data = loader(Path(root), split, limit)
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if len(data) == 0:
        raise UserError(f"the {split} split of {name} in {root} is empty")
    return data


def load_split(args, split, limit):
    """A run's `split` ("train" or "test"), at most `limit` images, as its flags describe it:
    the loader training.loop.start_run is handed."""
    return load_dataset(args.dataset, args.data_root, split, limit, **data_options(args))


def data_options(args):
    """load_dataset's options from a run's flags (a namespace, or a checkpoint's saved args):
    those a run of an older version lacks take their defaults."""
    get = lambda k, default: getattr(args, k, default) if not isinstance(args, dict) \
        else args.get(k, default)
    return {"image_size": get("image_size", 64), "crop": get("crop", 148),
            "channels": get("channels", None), "labels": get("labels", None),
            "cache_dir": get("cache_dir", None), "val_fraction": get("val_fraction", 0.1)}


def _limit(data, limit):
    if limit is None or limit >= len(data):
        return data
    data.images = data.images[:limit]
    data.labels = None if data.labels is None else data.labels[:limit]
    return data


def epoch_order(n, seed, epoch, rank=0, world=1):
    """This rank's shard of the epoch's permutation of n items: a pure function of
    (seed, epoch), so a resumed run replays exactly; ranks take interleaved, disjoint shares."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[rank:n - n % world:world]


class DeviceBatches:
    """Mini-batches sliced from a tensor that lives on the training device: uint8 images, or
    any items (the prior's code grids) through `indices`.

    The items move to the device once; each epoch is a permutation drawn from a generator
    seeded by (seed, epoch), so the order is a pure function of the epoch and a resumed run
    sees exactly the batches it would have seen. Floats are made on the device. Every batch
    is full; an epoch's remainder is left out. With `world > 1` each rank takes its own shard
    of the same permutation.
    """

    def __init__(self, images, batch_size, device, seed=0, binarize=False, rank=0, world=1,
                 channels_last=False):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.images = self.place(images, device)
        self.batch_size, self.device, self.seed = batch_size, torch.device(device), seed
        self.binarize, self.rank, self.world = binarize, rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        n = len(images) // world
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(images)} images are fewer than one batch of {batch_size}"
                            f"{f' on each of {world} ranks' if world > 1 else ''}")

    def __len__(self):
        return self.steps_per_epoch

    @staticmethod
    def place(images, device):
        return images.to(device)

    def to_float(self, x):
        x = x.float().div_(255).contiguous(memory_format=self.memory_format)
        return torch.bernoulli(x) if self.binarize else x

    def indices(self, epoch, start=0):
        """Yield the index batches (on the device) of `epoch`, beginning at batch `start`."""
        perm = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world)
        perm = perm.to(self.device)
        for i in range(start, self.steps_per_epoch):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]

    def epoch(self, epoch, start=0):
        """Yield the float image batches of `epoch`, beginning at batch `start`."""
        for idx in self.indices(epoch, start):
            yield self.to_float(self.images[idx])


class HostBatches(DeviceBatches):
    """The batches of DeviceBatches, the same ones in the same order, gathered from a split
    that stays in host memory or in a memory-mapped cache, for a split too large for the device.

    A thread gathers the next batch's rows while the current step runs; on CUDA into pinned
    memory, copied to the device on a stream of its own one step ahead, so the step waits for
    neither. Only the gather and the copy differ from DeviceBatches: the images that reach the
    step, and so the losses of a seeded run, are the same on either path.
    """

    @staticmethod
    def place(images, device):
        return images                       # stays where it is: host memory or a memory map

    def gather(self, idx):
        """The uint8 rows `idx` (a host index batch), pinned for an asynchronous copy on CUDA."""
        rows = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")
        return torch.index_select(self.images, 0, idx, out=rows)

    def indices(self, epoch, start=0):
        """Yield the index batches (on the host) of `epoch`, beginning at batch `start`."""
        perm = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world)
        for i in range(start, self.steps_per_epoch):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]

    def epoch(self, epoch, start=0):
        from concurrent.futures import ThreadPoolExecutor
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def upload(rows):                   # on CUDA: queued on the copy stream, not waited for
            if not cuda:
                return rows.to(self.device)
            with torch.cuda.stream(stream):
                return rows.to(self.device, non_blocking=True)

        order = self.indices(epoch, start)
        with ThreadPoolExecutor(1) as pool:
            gathering = [pool.submit(self.gather, idx) for idx in itertools.islice(order, 2)]
            ahead = upload(gathering.pop(0).result()) if gathering else None
            while ahead is not None:
                x = ahead
                nxt = next(order, None)
                if nxt is not None:
                    gathering.append(pool.submit(self.gather, nxt))
                ahead = upload(gathering.pop(0).result()) if gathering else None
                if cuda:                    # the step's stream waits for this batch's copy
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    x.record_stream(torch.cuda.current_stream(self.device))
                yield self.to_float(x)


# A split is copied to the training device when it takes at most this share of the device's
# free memory (the model, its activations and Adam's moments need the rest); otherwise its
# batches come from host memory, or from the memory-mapped cache when it exceeds this share of
# the host's available memory too.
DEVICE_SHARE = 0.5
HOST_SHARE = 0.5


def host_memory_available():
    """Bytes of host memory available (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_free(device):
    """Bytes free on an accelerator (CUDA: mem_get_info; MPS: its recommended working set
    less what is allocated), or None for the CPU (the host's memory is the device's)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return None


def gigabytes(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def choose_placement(images, device, requested="auto", mapped=False):
    """Where a training split's batches come from: ("device", why) when the split is copied
    to the device once (DeviceBatches), ("host", why) when it stays in host memory, or in its
    memory-mapped cache (`mapped`), and each batch is copied (HostBatches). `requested` is
    --data-on; "auto" copies the split to the device when it takes at most DEVICE_SHARE of the
    device's free memory. A split told to go to a device it does not fit is refused in one line
    naming the sizes and the flags that help."""
    nbytes = images.numel() * images.element_size()
    size = (f"the training split ({gigabytes(nbytes)}: {len(images):,} images of "
            f"{'x'.join(map(str, images.shape[1:]))})")
    host = host_memory_available()
    large = host is not None and nbytes > HOST_SHARE * host
    source = "host memory"
    if mapped:
        source = "its memory-mapped cache" + (
            f" (over {HOST_SHARE:.0%} of the host's {gigabytes(host)} available: read from "
            "disk as batches need it)" if large else "")
    device = torch.device(device)
    free = device_memory_free(device)
    if free is None:                           # the CPU: the device's memory is the host's
        where = "host" if requested == "host" or (requested == "auto" and mapped and large) \
            else "device"
        return where, f"data: {size} in {source}"
    fits = nbytes <= DEVICE_SHARE * free
    room = f"{DEVICE_SHARE:.0%} of the {gigabytes(free)} free on {device}"
    if requested == "device" and not fits:
        raise UserError(f"{size} does not fit {room}; pass --data-on host (batches copied "
                        "from host memory each step), or a smaller --image-size, or --limit")
    if requested == "device" or (requested == "auto" and fits):
        return "device", f"data: {size} copied to {device} once (it fits {room})"
    why = "--data-on host" if requested == "host" else f"it exceeds {room}"
    return "host", (f"data: {size} stays in {source}, each batch copied to {device} one step "
                    f"ahead ({why})")


def training_batches(images, batch_size, device, seed=0, binarize=False, rank=0, world=1,
                     channels_last=False, data_on="auto", mapped=False):
    """DeviceBatches or HostBatches of a training split (`choose_placement`); the line that
    says which and why is printed (rank 0), as the run starts."""
    where, why = choose_placement(images, device, data_on, mapped)
    if distributed.DIST.main:
        print(why)
    kind = DeviceBatches if where == "device" else HostBatches
    return kind(images, batch_size, device, seed, binarize, rank, world, channels_last)


def iterate(images, batch_size, device):
    """Yield float batches of a uint8 tensor in order (evaluation)."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)


# ----------------------------------------------------------------------------------------------
# MNIST: IDX files
# ----------------------------------------------------------------------------------------------
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_GET = ("get them with `python -c \"import torchvision; torchvision.datasets.MNIST('{root}', "
             "download=True)\"` on a machine with internet")


def read_idx(path, shape):
    """A uint8 IDX file (magic 0 0 0x08 ndim, big-endian sizes, then the bytes, optionally
    gzipped), checked against `shape` (None: any size)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim = len(shape)
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"its magic number is {raw[:4].hex() or 'missing'}, not "
                         f"{bytes([0, 0, 8, ndim]).hex()} (uint8, {ndim} dimensions)")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError("its header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if any(want is not None and d != want for d, want in zip(dims, shape)):
        want = ["N" if w is None else w for w in shape]
        raise ValueError(f"it holds {list(dims)}, expected {want}")
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"it holds {len(body)} bytes of data where its header promises "
                         f"{math.prod(dims)} (cut short?)")
    return np.frombuffer(body, np.uint8).reshape(dims)


def load_mnist(root, split, limit=None):
    """MNIST from its IDX files (or .gz) in `root`/MNIST/raw; a download is tried only when a
    file is missing, and a damaged file is named, never taken for a missing one."""
    raw = root / "MNIST" / "raw"
    names = MNIST_FILES[split]

    def find():
        return [next((p for p in (raw / n, raw / f"{n}.gz") if p.is_file()), None) for n in names]

    if None in find():
        try:                # not on disk: try the download once, quietly
            torchvision.datasets.MNIST(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as e:
            missing = [n for n, p in zip(names, find()) if p is None]
            raise DatasetNotFound(
                f"MNIST not found: {raw} lacks {', '.join(missing)} and the download failed "
                f"({type(e).__name__}). Expected train-images-idx3-ubyte, "
                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                f"(optionally .gz) there; {MNIST_GET.format(root=root)}. "
                "`--dataset dsprites` works offline.") from None
    arrays = []
    for path, shape in zip(find(), ((None, 28, 28), (None,))):
        try:
            arrays.append(read_idx(path, shape))
        except (OSError, ValueError, EOFError) as e:       # gzip errors are OSError/EOFError
            raise UserError(f"{path} is not a valid MNIST IDX file: {e}; delete it and "
                            f"{MNIST_GET.format(root=root)}") from None
    images, labels = arrays
    if len(images) != len(labels) or (labels > 9).any():
        raise UserError(f"{raw}: {len(images)} images but {len(labels)} labels (or a label "
                        f"above 9) in the {split} files; replace them with fresh copies: "
                        f"{MNIST_GET.format(root=root)}")
    return _limit(ImageSet("mnist", torch.from_numpy(images.copy()).unsqueeze(1),
                           torch.from_numpy(labels.astype(np.int64)), label_names=["digit"]),
                  limit)


# ----------------------------------------------------------------------------------------------
# CIFAR-10: pickled batches
# ----------------------------------------------------------------------------------------------
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else. A batch is a dict of strings, lists and
    numbers with numpy arrays in it; those need only the names below. Any other global
    (os.system, builtins.eval, ...) is refused, so a crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR-10 "
                                         "batch holds (refused, not run)")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """(data (N, 3072) uint8, labels (N,) int64) of one CIFAR-10 batch file, checked."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"its data is {data.dtype} {list(data.shape)}, expected uint8 "
                             "[N, 3072]")
        if labels.shape != (len(data),) or not ((labels >= 0) & (labels < 10)).all():
            raise ValueError(f"it has {labels.size} labels for {len(data)} images, or a label "
                             "outside 0-9")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError,
            AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a valid CIFAR-10 batch: {str(e)[:200]}; delete it and "
                        f"extract a fresh copy of {CIFAR_URL}") from None
    return data, labels


def load_cifar10(root, split, limit=None):
    """CIFAR-10 from the standard `cifar-10-batches-py` pickle batches (read directly, no md5)."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / n).exists() for n in names):
        try:
            torchvision.datasets.utils.download_and_extract_archive(CIFAR_URL, str(root),
                                                                    md5=CIFAR_MD5)
        except (RuntimeError, OSError) as e:
            missing = [n for n in names if not (folder / n).exists()]
            raise DatasetNotFound(
                f"CIFAR-10 not found: {folder} lacks {', '.join(missing)} and the download "
                f"failed ({type(e).__name__}). Download cifar-10-python.tar.gz from "
                f"{CIFAR_URL} and extract it into {root}. "
                "`--dataset dsprites` works offline.") from None
    images, labels = [], []
    for n in names:
        data, classes = read_cifar_batch(folder / n)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(classes)
    return _limit(ImageSet("cifar10", torch.from_numpy(np.concatenate(images)),
                           torch.from_numpy(np.concatenate(labels)), label_names=["class"],
                           value_names={"class": list(CIFAR_CLASSES)}), limit)


# ----------------------------------------------------------------------------------------------
# CelebA: JPEGs with attribute and partition files (decoded once into a cache, below)
# ----------------------------------------------------------------------------------------------
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
CELEBA_HELP = (
    "Get CelebA's aligned images (img_align_celeba.zip) and list_attr_celeba.txt, "
    "list_eval_partition.txt from the authors' page (mmlab.ie.cuhk.edu.hk/projects/CelebA.html) "
    "or a mirror with the CSV layout (img_align_celeba/img_align_celeba/, list_attr_celeba.csv, "
    "list_eval_partition.csv), and put them in {folder}. torchvision's CelebA(download=True) "
    "often fails with a Google Drive 'quota exceeded' page, so download by hand. "
    "`--dataset dsprites` works offline.")


def celeba_files(root):
    """Find CelebA under `root`/celeba or `root`, in the official or the mirror (CSV) layout.

    Returns (image folder, attribute file, partition file)."""
    candidates = [root / "celeba", root]
    for folder in candidates:
        official = (folder / "img_align_celeba", folder / "list_attr_celeba.txt",
                    folder / "list_eval_partition.txt")
        mirror = (folder / "img_align_celeba" / "img_align_celeba",
                  folder / "list_attr_celeba.csv", folder / "list_eval_partition.csv")
        for layout in (mirror, official):            # the mirror nests its images one deeper
            if all(p.exists() for p in layout):
                return layout
    for folder in candidates:                         # say precisely what is missing
        for layout in ((folder / "img_align_celeba" / "img_align_celeba",
                        folder / "list_attr_celeba.csv", folder / "list_eval_partition.csv"),
                       (folder / "img_align_celeba", folder / "list_attr_celeba.txt",
                        folder / "list_eval_partition.txt")):
            present = [p for p in layout if p.exists()]
            if present and len(present) < 3:
                missing = ", ".join(str(p) for p in layout if not p.exists())
                raise DatasetNotFound(f"CelebA in {folder} is incomplete: missing {missing}. "
                                      + CELEBA_HELP.format(folder=folder))
    raise DatasetNotFound(f"CelebA not found: looked for {root / 'celeba' / 'img_align_celeba'} "
                          "with list_attr_celeba.txt and list_eval_partition.txt (or the .csv "
                          "mirror layout) in " + f"{root / 'celeba'} and {root}. "
                          + CELEBA_HELP.format(folder=root / "celeba"))


def read_celeba_attributes(path):
    """(file names, attribute names, (N, 40) int8 in {0, 1}) from the .txt or .csv format."""
    try:
        lines = path.read_text().splitlines()
        if path.suffix == ".csv":
            names = lines[0].strip().split(",")[1:]
            rows = [line.strip().split(",") for line in lines[1:] if line.strip()]
        else:       # line 1: count; line 2: the names; then 'file  -1  1 ...', spacing varies
            count, names = int(lines[0].split()[0]), lines[1].split()
            rows = [line.split() for line in lines[2:] if line.strip()]
            if len(rows) != count:
                raise ValueError(f"header says {count} rows, found {len(rows)}")
        files = [r[0] for r in rows]
        values = np.array([[int(v) for v in r[1:]] for r in rows], np.int8)
        if values.shape[1:] != (len(names),) or not np.isin(values, (-1, 1)).all():
            raise ValueError("expected one -1/1 value per attribute on every row")
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a CelebA attribute file: {e}") from None
    return files, names, (values > 0).astype(np.int8)


def read_celeba_partition(path):
    """{file name: 0 train / 1 valid / 2 test} from the .txt or .csv format."""
    try:
        lines = path.read_text().splitlines()
        if path.suffix == ".csv":
            lines = [line.replace(",", " ") for line in lines[1:]]
        part = {f: int(p) for f, p in (line.split() for line in lines if line.strip())}
        if not set(part.values()) <= {0, 1, 2}:
            raise ValueError("partitions must be 0, 1 or 2")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a CelebA partition file: {e}") from None
    return part


def open_cache(path, shape, remedy):
    """Memory-map a cache .npy after checking that it is one: uint8 of `shape`, every byte
    present. Else one line naming the file, what is wrong and what to do (`remedy`)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        problem = None if isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and \
            arr.shape == tuple(shape) else \
            f"holds {getattr(arr, 'dtype', 'no')} {list(getattr(arr, 'shape', []))}, expected " \
            f"uint8 {list(shape)}"
    except (OSError, ValueError, EOFError) as e:
        problem = f"is not a complete .npy file ({str(e).strip()[:120] or type(e).__name__})"
    if problem:
        raise UserError(f"the cache {path} {problem}: it is damaged or was not written by this "
                        f"version; {remedy}")
    return arr


def load_celeba(root, split, limit=None, image_size=64, crop=148):
    """CelebA: official splits, the 40 attributes by name, centre crop `crop` -> `image_size`."""
    if crop <= 0 or image_size <= 0 or image_size > crop:
        raise UserError(f"--image-size {image_size} and --crop {crop} must be positive with "
                        "the size at most the crop")
    folder, attr_file, part_file = celeba_files(root)
    files, names, attrs = read_celeba_attributes(attr_file)
    partition = read_celeba_partition(part_file)
    missing = [f for f in files if f not in partition]
    if missing:
        raise UserError(f"{part_file} lacks {len(missing)} images of {attr_file}, "
                        f"e.g. {missing[0]}")
    # cache named by crop and size, so changing either never reuses a stale cache
    cache = attr_file.parent / f"celeba_cache_crop{crop}_{image_size}px.npy"
    stamp = {"files": len(files), "first": files[0], "last": files[-1], "crop": crop,
             "size": image_size}

    def current():
        try:
            return cache.exists() and json.loads(cache.with_suffix(".json").read_text()) == stamp
        except (OSError, ValueError):
            return False

    if not current():
        with building(attr_file.parent, f"the CelebA cache {cache}"):
            if not current():                        # not built by another process meanwhile
                cache.unlink(missing_ok=True)        # made from other files: rebuild
                try:
                    build_celeba_cache(folder, files, crop, image_size, cache, stamp)
                except OSError as e:
                    raise UserError(f"cannot write the CelebA cache {cache}: {e}") from None
    rows = np.array([i for i, f in enumerate(files) if partition[f] == CELEBA_SPLITS[split]],
                    np.int64)
    if limit is not None:
        rows = rows[:limit]
    cached = open_cache(cache, (len(files), 3, image_size, image_size),
                        f"delete it and rerun to decode {folder} again")
    contiguous = len(rows) > 0 and rows[-1] - rows[0] + 1 == len(rows)
    images = np.load(cache, mmap_mode="c")[rows[0]:rows[-1] + 1] if contiguous \
        else cached[rows]                    # a view of the file (copy-on-write), or a copy
    data = ImageSet("celeba", torch.from_numpy(images), torch.from_numpy(attrs[rows]),
                    label_names=names, mapped=contiguous)
    data.files = [files[i] for i in rows]
    return data


# ----------------------------------------------------------------------------------------------
# dSprites: the official factor grid (rendered once into a cache, below)
# ----------------------------------------------------------------------------------------------
# The official grid (Higgins et al. 2017; docs/papers.md): every combination of these factor values,
# the flat index being the class indices dotted with DSPRITES_STRIDES (posY varies fastest).
DSPRITES_FACTORS = ("color", "shape", "scale", "orientation", "posX", "posY")
DSPRITES_SIZES = (1, 3, 6, 40, 32, 32)
DSPRITES_STRIDES = (737280, 245760, 40960, 1024, 32, 1)
DSPRITES_SHAPES = ("square", "ellipse", "heart")
DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
DSPRITES_CACHE = "dsprites_rendered_64x64.npy"
DSPRITES_OFFICIAL_CACHE = "dsprites_official_64x64.npy"
DSPRITES_TEST_FRACTION = 0.1
DSPRITES_SPLIT_SEED = 20170101     # fixed: the hold-out never depends on --seed


def dsprites_factor_values():
    """The values of each factor, as the official grid lists them (docs/papers.md)."""
    return [torch.ones(1), torch.arange(1.0, 4.0), torch.linspace(0.5, 1.0, 6),
            torch.linspace(0, 2 * math.pi, 40, dtype=torch.float64).float(),
            torch.linspace(0, 1, 32), torch.linspace(0, 1, 32)]


def dsprites_classes(index=None):
    """Factor classes (N, 6) of flat indices (default: all 737,280 in official order)."""
    if index is None:
        index = torch.arange(DSPRITES_STRIDES[0])
    strides = torch.tensor(DSPRITES_STRIDES)
    sizes = torch.tensor(DSPRITES_SIZES)
    return (index[:, None] // strides) % sizes


def dsprites_values(classes):
    """Factor values (N, 6) of factor classes (N, 6)."""
    return torch.stack([v[classes[:, i]] for i, v in enumerate(dsprites_factor_values())], 1)


def dsprites_split(split):
    """Flat indices of the fixed, seeded 90/10 train/test hold-out, in a shuffled order."""
    g = torch.Generator().manual_seed(DSPRITES_SPLIT_SEED)
    perm = torch.randperm(DSPRITES_STRIDES[0], generator=g)
    n_test = int(DSPRITES_STRIDES[0] * DSPRITES_TEST_FRACTION)
    return perm[:n_test] if split == "test" else perm[n_test:]


def dsprites_cache(root, build=True):
    """The whole grid as a (737280, 64, 64) uint8 .npy under `root`/dsprites, memory-mappable.

    If the official npz is present (in `root` or `root`/dsprites) it is converted once;
    otherwise the project renders the grid once, if `build` (else None when absent).
    """
    root = Path(root)
    folder = root / "dsprites"
    official = [p for p in (root / DSPRITES_FILE, folder / DSPRITES_FILE) if p.exists()]
    cache = folder / (DSPRITES_OFFICIAL_CACHE if official else DSPRITES_CACHE)
    if cache.exists() or not (build or official):
        return cache if cache.exists() else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dSprites cache folder {folder}: {e}") from None
    with building(folder, f"the dSprites cache {cache}"):
        if not cache.exists():                 # not built by another process meanwhile
            for stale in folder.glob(f".{cache.name}.*"):     # left by a killed build
                stale.unlink()
            if official:
                _convert_official_dsprites(official[0], cache)
            else:
                _render_all_dsprites(cache)
    return cache


def dsprites_images(root, index):
    """Images (N, 1, 64, 64) uint8 {0, 255} at flat `index`.

    They come from the cache (official or rendered); without the official file, a request of up
    to 100,000 images with no cache yet is rendered directly and builds no 3 GB cache.
    """
    cache = dsprites_cache(root, build=len(index) > 100_000)
    if cache is None:
        return render_dsprites(dsprites_classes(index))
    imgs = open_cache(cache, (DSPRITES_STRIDES[0], 64, 64), "delete it and rerun to build it "
                      "again (from the official file if present, else rendered)")
    order = np.argsort(index.numpy())          # read the memory map in order, then un-sort
    out = np.empty((len(index), 64, 64), np.uint8)
    out[order] = imgs[index.numpy()[order]]
    return torch.from_numpy(out).unsqueeze(1)


def load_dsprites(root, split, limit=None):
    """dSprites: official file if present, else the project's own rendering of the same grid."""
    index = dsprites_split(split)
    if limit is not None:
        index = index[:limit]
    classes = dsprites_classes(index)
    return ImageSet("dsprites", dsprites_images(root, index), classes, list(DSPRITES_FACTORS),
                    binary=True, value_names={"shape": list(DSPRITES_SHAPES)})


# ==============================================================================================
# DATASET SYNTHESIS: the dSprites renderer and the CelebA decoding cache
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# dSprites rendered from the factor grid, or converted from the official file
# ----------------------------------------------------------------------------------------------
# Shape geometry in pixels at scale 1, as in the official images (docs/papers.md):
SQUARE_HALF_SIDE = 10.0                 # 20x20 px
ELLIPSE_SEMI_AXES = (13.0, 7.5)         # 26x14 px, long axis horizontal at orientation 0


# Heart: two lobe disks at (+-a, b) of radius r and a pointed bottom at (0, -t) (y up), the
# outline closed by the outer tangents from the tip to the lobes; fitted to the official hearts.
HEART = dict(a=4.5, b=4.0, r=5.25, t=8.75)


def _inside_heart(u, v):
    a, b, r, t = HEART["a"], HEART["b"], HEART["r"], HEART["t"]
    lobes = ((u - a) ** 2 + (v - b) ** 2 <= r * r) | ((u + a) ** 2 + (v - b) ** 2 <= r * r)
    # outer tangent point on the right lobe, seen from the tip (0, -t)
    dx, dy = a, b + t
    dist = math.hypot(dx, dy)
    angle = math.atan2(dy, dx) - math.asin(r / dist)
    reach = math.sqrt(dist * dist - r * r)
    tx, ty = reach * math.cos(angle), -t + reach * math.sin(angle)
    polygon = [(0.0, -t), (tx, ty), (a, b), (-a, b), (-tx, ty)]      # convex, counter-clockwise
    inside = torch.ones_like(lobes)
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return lobes | inside


def _inside_square(u, v):
    return torch.maximum(u.abs(), v.abs()) <= SQUARE_HALF_SIDE


def _inside_ellipse(u, v):
    return (u / ELLIPSE_SEMI_AXES[0]) ** 2 + (v / ELLIPSE_SEMI_AXES[1]) ** 2 <= 1


def render_dsprites(classes, chunk=8192):
    """Render dSprites images (N, 1, 64, 64) uint8 in {0, 255} for factor classes (N, 6).

    Binary pixels, no anti-aliasing: a pixel is on when its centre lies inside the shape.
    The sprite centre is 16 + 32*pos pixels; rotation is counter-clockwise as displayed.
    """
    values = dsprites_values(classes)
    out = torch.zeros(len(classes), 1, 64, 64, dtype=torch.uint8)
    win = torch.arange(32)                               # a 32-px window holds any sprite
    for start in range(0, len(classes), chunk):
        val, shape = values[start:start + chunk], classes[start:start + chunk, 1]
        n = len(val)
        cx, cy = 16 + 32 * val[:, 4], 16 + 32 * val[:, 5]
        col0, row0 = cx.floor().long() - 16, cy.floor().long() - 16   # window origin
        px = (col0[:, None] + win + 0.5 - cx[:, None])[:, None, :]   # (n, 1, 32), x right
        py = (cy[:, None] - (row0[:, None] + win + 0.5))[:, :, None]   # (n, 32, 1), y up
        theta, scale = val[:, 3, None, None], val[:, 2, None, None]
        cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
        mask = torch.empty(n, 32, 32, dtype=torch.bool)
        for s, inside in enumerate((_inside_square, _inside_ellipse, _inside_heart)):
            sel = (shape == s).nonzero()[:, 0]
            if len(sel):
                # rotate each pixel back into the sprite's own frame and undo the scale
                u = cos[sel] * px[sel] + sin[sel] * py[sel]           # (m, 32, 32)
                v = cos[sel] * py[sel] - sin[sel] * px[sel]
                mask[sel] = inside(u, v)
        rows = (row0[:, None] + win)[:, :, None]                        # (n, 32, 1)
        cols = (col0[:, None] + win)[:, None, :]                        # (n, 1, 32)
        out[start:start + n, 0][torch.arange(n)[:, None, None], rows, cols] = mask.to(torch.uint8) * 255
    return out


def _render_all_dsprites(path, part=8192):
    """Render the full grid into `path` (.npy, (737280, 64, 64) uint8), in parallel threads.
    An interrupted render (Ctrl-C, an error) leaves no partial file: the parts under way
    finish, the rest are dropped and the temporary file is removed."""
    from concurrent.futures import ThreadPoolExecutor
    n = DSPRITES_STRIDES[0]

    def work(i):
        idx = torch.arange(i, min(i + part, n))
        arr[i:i + len(idx)] = render_dsprites(dsprites_classes(idx))[:, 0].numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1))
    try:
        with replacing(path, ".partial.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 64, 64))
            list(progress.bar(pool.map(work, range(0, n, part)), total=math.ceil(n / part),
                              desc=f"rendering dSprites into {path}", unit="part",
                              what=f"{n:,} images"))
            arr.flush()
            del arr
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def _convert_official_dsprites(npz, cache):
    """Stream `imgs` (0/1) of the official npz into the cache (0/255) without 3 GB in memory."""
    n = DSPRITES_STRIDES[0]
    with replacing(cache, ".partial.npy") as tmp:
        try:
            with zipfile.ZipFile(npz) as zf:
                with zf.open("latents_classes.npy") as f:
                    classes = np.lib.format.read_array(f)
                if classes.shape != (n, 6) or not np.array_equal(classes,
                                                                 dsprites_classes().numpy()):
                    raise ValueError("latents_classes is not the official 737280x6 grid in "
                                     "order")
                with zf.open("imgs.npy") as f:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f)
                                             if version == (1, 0)
                                             else np.lib.format.read_array_header_2_0(f))
                    if shape != (n, 64, 64) or fortran or dtype != np.uint8:
                        raise ValueError(f"imgs is {dtype}{list(shape)}, expected "
                                         f"uint8[{n}, 64, 64]")
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                    chunk = 16384
                    for i in progress.bar(range(0, n, chunk), desc=f"converting {npz.name}",
                                          unit="chunk"):
                        m = min(chunk, n - i)
                        block = np.frombuffer(f.read(m * 4096), np.uint8)
                        if block.size != m * 4096:
                            raise ValueError("imgs ends early")
                        arr[i:i + m] = block.reshape(m, 64, 64) * np.uint8(255)
                    arr.flush()
                    del arr
        except UserError:               # a ValueError too (a full disk, say): already clear
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{npz} is not a readable official dSprites file: {e}") from None


# ----------------------------------------------------------------------------------------------
# CelebA decoded once (crop, resize) into a uint8 cache, in parallel and resumable
# ----------------------------------------------------------------------------------------------
def _decode_celeba(job):
    """Worker: decode, centre-crop and resize some JPEGs -> (n, 3, S, S) uint8, or an error."""
    from PIL import Image, UnidentifiedImageError
    paths, crop, size = job
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                if min(w, h) < crop:
                    return f"{path} is {w}x{h}, smaller than the {crop}x{crop} centre crop"
                left, top = (w - crop) // 2, (h - crop) // 2
                img = img.crop((left, top, left + crop, top + crop))
                img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
                out[i] = np.asarray(img).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return f"cannot read image {path}: {e}"
    return out


def build_celeba_cache(folder, files, crop, size, cache, stamp, chunk=1000, workers=None):
    """Decode every JPEG once into `cache` (N, 3, S, S) uint8 .npy (the shared, parallel and
    resumable image_folders.build_image_cache); a file that cannot be read stops the build
    with its name."""
    image_folders.build_image_cache([str(folder / f) for f in files], _decode_celeba, (crop, size),
                      (len(files), 3, size, size), cache, stamp,
                      f"decoding CelebA into {cache.name}", chunk, workers)
