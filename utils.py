"""Shared plumbing for the training scripts: data, devices, checkpoints, image grids, plots.

No model or loss lives here; each algorithm is told top to bottom in its own script.
"""
import argparse
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

DATASETS = ("mnist", "cifar10", "celeba", "dsprites")


class UserError(SystemExit):
    """A mistake in the input (flags, files): printed as one line, exit status 1, no traceback."""

    def __init__(self, message):
        self.message = message
        super().__init__(f"error: {message}")

    def __str__(self):
        return self.message


class DatasetNotFound(UserError):
    pass


class CheckpointError(UserError):
    pass


# ----------------------------------------------------------------------------------------------
# Data: every dataset becomes a uint8 (N, C, H, W) tensor plus its labels
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """A whole split in memory. `images` is uint8 (N, C, H, W), 255 = white."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None          # (N,) class or (N, F) factor classes
    values: torch.Tensor | None = None          # (N, F) factor values (dSprites)
    label_names: list = field(default_factory=list)
    binary: bool = False                        # pixels are exactly 0 or 255
    files: list = field(default_factory=list)   # file names, where the images have them
    value_names: dict = field(default_factory=dict)   # {label: names of its classes}

    def __len__(self):
        return self.images.shape[0]

    @property
    def image_size(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]


def add_data_args(p, dataset="dsprites"):
    p.add_argument("--dataset", default=dataset, choices=DATASETS,
                   help="training data (dsprites is rendered locally and works offline)")
    p.add_argument("--data-root", default="data", help="where datasets live")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N training images (default: all)")
    p.add_argument("--image-size", type=int, default=64,
                   help="CelebA: side of the resized centre crop")
    p.add_argument("--crop", type=int, default=148,
                   help="CelebA: side of the centre crop before resizing")


def load_dataset(name, root, split, limit=None, image_size=64, crop=148):
    """Load `split` ('train', 'test'; CelebA also 'valid') of a dataset as an ImageSet."""
    if split not in ("train", "valid", "test"):
        raise UserError(f"unknown split {split!r}; use 'train', 'valid' or 'test'")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if name == "celeba":
        data = load_celeba(Path(root), split, limit, image_size, crop)
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


def _limit(data, limit):
    if limit is None or limit >= len(data):
        return data
    data.images = data.images[:limit]
    data.labels = None if data.labels is None else data.labels[:limit]
    data.values = None if data.values is None else data.values[:limit]
    return data


def load_mnist(root, split, limit=None):
    """MNIST through torchvision (its `.data`/`.targets` tensors; no per-item PIL)."""
    train = split == "train"
    try:
        ds = torchvision.datasets.MNIST(str(root), train=train, download=False)
    except RuntimeError:
        try:  # not on disk: try the download once, quietly
            ds = torchvision.datasets.MNIST(str(root), train=train, download=True)
        except (RuntimeError, OSError) as e:
            raw = root / "MNIST" / "raw"
            raise DatasetNotFound(
                f"MNIST not found in {raw} and the download failed ({type(e).__name__}). "
                "Expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) there; "
                "get them with `python -c \"import torchvision; torchvision.datasets.MNIST("
                f"'{root}', download=True)\"` on a machine with internet. "
                "`--dataset dsprites` works offline.") from None
    return _limit(ImageSet("mnist", ds.data.unsqueeze(1).contiguous(), ds.targets.clone(),
                           label_names=["digit"]), limit)


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


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
        with open(folder / n, "rb") as f:
            try:
                batch = pickle.load(f, encoding="latin1")
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise UserError(f"{folder / n} is not a readable CIFAR batch: {e}") from None
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return _limit(ImageSet("cifar10", torch.from_numpy(np.concatenate(images)),
                           torch.from_numpy(np.concatenate(labels)), label_names=["class"],
                           value_names={"class": list(CIFAR_CLASSES)}), limit)


# ---- CelebA -----------------------------------------------------------------------------------
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


class _InProcess:
    """The executor interface, run in this process (one chunk needs no worker pool)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return map(fn, jobs)


def build_celeba_cache(folder, files, crop, size, cache, stamp, chunk=1000, workers=None):
    """Decode every JPEG once into `cache` (N, 3, S, S) uint8 .npy, in parallel, resumably.

    Finished chunks are recorded beside the partial file, so an interrupted build continues;
    `stamp` (what the cache was made from) is written to cache.json before the cache appears.
    """
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm
    n = len(files)
    partial = cache.with_name(cache.stem + ".partial.npy")
    progress = cache.with_name(cache.stem + ".progress.json")
    done = set()
    if partial.exists() and progress.exists():
        try:
            meta = json.loads(progress.read_text())
            if meta["files"] == n:
                done = set(meta["done"])
        except (ValueError, KeyError):
            done = set()
    if not done:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    else:
        arr = np.load(partial, mmap_mode="r+")
    todo = [i for i in range(0, n, chunk) if i not in done]
    workers = min(workers or os.cpu_count() or 1, len(todo))
    jobs = [([str(folder / f) for f in files[i:i + chunk]], crop, size) for i in todo]
    with ProcessPoolExecutor(workers) if workers > 1 else _InProcess() as pool, \
            tqdm(total=n, initial=n - sum(min(chunk, n - i) for i in todo),
                 desc=f"decoding CelebA into {cache.name}", unit="img") as bar:
        for i, block in zip(todo, pool.map(_decode_celeba, jobs)):
            if isinstance(block, str):
                raise UserError(block)
            arr[i:i + len(block)] = block
            arr.flush()
            done.add(i)
            progress.write_text(json.dumps({"files": n, "done": sorted(done)}))
            bar.update(len(block))
    del arr
    cache.with_suffix(".json").write_text(json.dumps(stamp))
    os.replace(partial, cache)
    progress.unlink()


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
    meta = cache.with_suffix(".json")
    stamp = {"files": len(files), "first": files[0], "last": files[-1], "crop": crop,
             "size": image_size}
    if cache.exists() and (not meta.exists() or json.loads(meta.read_text()) != stamp):
        cache.unlink()                   # made from other files: rebuild
    if not cache.exists():
        try:
            build_celeba_cache(folder, files, crop, image_size, cache, stamp)
        except OSError as e:
            raise UserError(f"cannot write the CelebA cache {cache}: {e}") from None
    rows = np.array([i for i, f in enumerate(files) if partition[f] == CELEBA_SPLITS[split]],
                    np.int64)
    if limit is not None:
        rows = rows[:limit]
    images = np.load(cache, mmap_mode="r")[rows]
    data = ImageSet("celeba", torch.from_numpy(images), torch.from_numpy(attrs[rows]),
                    label_names=names)
    data.files = [files[i] for i in rows]
    return data


# ---- dSprites ---------------------------------------------------------------------------------
# The official grid (Higgins et al. 2017, REFERENCE.md): every combination of these factor values,
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

# Shape geometry in pixels at scale 1, measured against official images (shared/ masks):
SQUARE_HALF_SIDE = 10.0                 # 20x20 px
ELLIPSE_SEMI_AXES = (13.0, 7.5)         # 26x14 px, long axis horizontal at orientation 0
# Heart: two lobe disks at (+-a, b) of radius r and a pointed bottom at (0, -t) (y up), the
# outline closed by the outer tangents from the tip to the lobes; fitted to the official masks.
HEART = dict(a=4.5, b=4.0, r=5.25, t=8.75)


def dsprites_factor_values():
    """The values of each factor, as listed in REFERENCE.md."""
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


def _inside_square(u, v):
    return torch.maximum(u.abs(), v.abs()) <= SQUARE_HALF_SIDE


def _inside_ellipse(u, v):
    return (u / ELLIPSE_SEMI_AXES[0]) ** 2 + (v / ELLIPSE_SEMI_AXES[1]) ** 2 <= 1


def _render_all_dsprites(path):
    """Render the full grid into `path` (.npy, (737280, 64, 64) uint8), in parallel, resumably."""
    from tqdm import tqdm
    n, part = DSPRITES_STRIDES[0], 40960                     # one part per (shape, scale)
    tmp = path.with_suffix(".partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 64, 64))
    threads = torch.get_num_threads()
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        idx = torch.arange(i, min(i + part, n))
        arr[i:i + len(idx)] = render_dsprites(dsprites_classes(idx))[:, 0].numpy()

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            list(tqdm(pool.map(work, range(0, n, part)), total=math.ceil(n / part),
                      desc=f"rendering dSprites into {path}", unit="part"))
    finally:
        torch.set_num_threads(threads)
    arr.flush()
    del arr
    os.replace(tmp, path)


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
    if official:
        _convert_official_dsprites(official[0], cache)
    else:
        _render_all_dsprites(cache)
    return cache


def _convert_official_dsprites(npz, cache):
    """Stream `imgs` (0/1) of the official npz into the cache (0/255) without 3 GB in memory."""
    from tqdm import tqdm
    n = DSPRITES_STRIDES[0]
    try:
        with zipfile.ZipFile(npz) as zf:
            with zf.open("latents_classes.npy") as f:
                classes = np.lib.format.read_array(f)
            if classes.shape != (n, 6) or not np.array_equal(classes, dsprites_classes().numpy()):
                raise ValueError("latents_classes is not the official 737280x6 grid in order")
            with zf.open("imgs.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                if shape != (n, 64, 64) or fortran or dtype != np.uint8:
                    raise ValueError(f"imgs is {dtype}{list(shape)}, expected uint8[{n}, 64, 64]")
                tmp = cache.with_suffix(".partial.npy")
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                chunk = 16384
                for i in tqdm(range(0, n, chunk), desc=f"converting {npz.name}", unit="chunk"):
                    m = min(chunk, n - i)
                    block = np.frombuffer(f.read(m * 4096), np.uint8)
                    if block.size != m * 4096:
                        raise ValueError("imgs ends early")
                    arr[i:i + m] = block.reshape(m, 64, 64) * np.uint8(255)
                arr.flush()
                del arr
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{npz} is not a readable official dSprites file: {e}") from None
    os.replace(tmp, cache)


def dsprites_images(root, index):
    """Images (N, 1, 64, 64) uint8 {0, 255} at flat `index`.

    They come from the cache (official or rendered); without the official file, a request of up
    to 100,000 images with no cache yet is rendered directly and builds no 3 GB cache.
    """
    cache = dsprites_cache(root, build=len(index) > 100_000)
    if cache is None:
        return render_dsprites(dsprites_classes(index))
    imgs = np.load(cache, mmap_mode="r")
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
    return ImageSet("dsprites", dsprites_images(root, index), classes, dsprites_values(classes),
                    list(DSPRITES_FACTORS), binary=True,
                    value_names={"shape": list(DSPRITES_SHAPES)})


# ---- batches ----------------------------------------------------------------------------------
def epoch_order(n, seed, epoch, rank=0, world=1):
    """This rank's shard of the epoch's permutation of n items: a pure function of
    (seed, epoch), so a resumed run replays exactly; ranks take interleaved, disjoint shares."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[rank:n - n % world:world]


class DeviceBatches:
    """Mini-batches sliced from a uint8 image tensor that lives on the training device.

    The images move to the device once; each epoch is a permutation drawn from a generator
    seeded by (seed, epoch), so the order is a pure function of the epoch and a resumed run
    sees exactly the batches it would have seen. Floats are made on the device.
    With `world > 1` each rank takes its own shard of the same permutation.
    """

    def __init__(self, images, batch_size, device, seed=0, binarize=False, drop_last=True,
                 rank=0, world=1, channels_last=False):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.images = images.to(device)
        self.batch_size, self.device, self.seed = batch_size, torch.device(device), seed
        self.binarize, self.rank, self.world = binarize, rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        n = len(images) // world
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(images)} images are fewer than one batch of {batch_size}"
                            f"{f' on each of {world} ranks' if world > 1 else ''}")

    def __len__(self):
        return self.steps_per_epoch

    def to_float(self, x):
        x = x.float().div_(255).contiguous(memory_format=self.memory_format)
        return torch.bernoulli(x) if self.binarize else x

    def epoch(self, epoch, start=0):
        """Yield the float batches of `epoch`, beginning at batch `start`."""
        perm = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world)
        perm = perm.to(self.device)
        for i in range(start, self.steps_per_epoch):
            yield self.to_float(self.images[perm[i * self.batch_size:(i + 1) * self.batch_size]])


def iterate(images, batch_size, device):
    """Yield float batches of a uint8 tensor in order (evaluation)."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)


# ----------------------------------------------------------------------------------------------
# Devices, seeding, run folders
# ----------------------------------------------------------------------------------------------
def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def prepare_out(out):
    """Create the run folder and prove it is writable before any training starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for flags whose help already says it or whose default is
    None or False."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_common_args(p, latent=10, lr=1e-3, batch_size=64, epochs=10, dataset="dsprites"):
    """The command-line contract shared by the training scripts."""
    add_data_args(p, dataset)
    p.add_argument("--epochs", type=int, default=epochs, help="epochs")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="images per step")
    p.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    p.add_argument("--latent", type=int, default=latent,
                   help="latent dimensions")
    p.add_argument("--out", default=None, help="run folder (default: runs/<script>_<dataset>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue the run in --out from its checkpoint.pt (or from PATH, "
                        "e.g. checkpoint.prev.pt); typed flags such as --epochs or --lr "
                        "replace the saved ones")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="device (auto = cuda, then mps, then cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--eval-limit", type=int, default=10_000,
                   help="held-out images used for evaluation")
    p.add_argument("--log-every", type=int, default=100,
                   help="steps between reads of the running loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", action="store_true",
                   help="disable bf16 autocast on CUDA (losses are always fp32)")


def check_common_args(args, script):
    if args.latent <= 0:
        raise UserError(f"--latent must be positive, got {args.latent}")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {args.max_steps}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.dataset != "celeba" and (args.image_size, args.crop) != (64, 148):
        raise UserError("--image-size and --crop apply to celeba only; the other datasets "
                        "keep their native size")
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UserError(f"--eval-limit must be positive, got {args.eval_limit}")
    if args.out is None:
        args.out = str(Path("runs") / f"{script}_{args.dataset}")
    return args


def autocast(device, enabled=True):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=enabled and torch.device(device).type == "cuda")


def adam(params, lr, device):
    """Adam with the fused kernel on CUDA and the foreach path elsewhere."""
    cuda = torch.device(device).type == "cuda"
    return torch.optim.Adam(params, lr=lr, fused=cuda or None, foreach=None if cuda else True)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, the previous one kept, safe loads
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Write `state` atomically to `path`; the checkpoint it replaces becomes *.prev.pt."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        prev = path.with_name(path.stem + ".prev.pt")
        prev_tmp = path.with_name(f".{prev.name}.tmp")
        if prev_tmp.exists():
            prev_tmp.unlink()
        os.link(path, prev_tmp)               # the current file stays in place throughout
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True; a damaged file names its fallback."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError) as e:
        prev = path.with_name(path.stem + ".prev.pt")
        hint = (f"; the previous good checkpoint is {prev}: continue from it with "
                f"--resume {prev}" if prev.exists() and prev != path else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint "
                              f"({first[:200]}){hint}") from None
    if not isinstance(state, dict) or "model" not in state or "args" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts")
    return state


def check_checkpoint_kind(state, path, kind):
    found = state.get("kind")
    if found != kind:
        raise CheckpointError(f"{path} holds a {found or 'unknown'} model, not a {kind} model")


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def check_finite(terms, step, out):
    """Stop the run when a loss term is NaN or infinite; the last checkpoint is left untouched."""
    if not all(math.isfinite(v) for v in terms.values()):
        named = ", ".join(f"{k}={v}" for k, v in terms.items())
        ckpt = Path(out) / "checkpoint.pt"
        last = f"the last good checkpoint {ckpt} is untouched" if ckpt.exists() \
            else "no checkpoint had been written yet"
        raise UserError(f"non-finite loss at step {step} ({named}); stopping. {last}; "
                        "try a lower --lr")


class RunningMean:
    """Sums named loss terms (scalars or vectors) on the device, with no host-device sync.

    `read()` is the one sync per log interval: it returns the means since the last read as
    Python numbers (vectors as lists) and stops the run if a scalar term is not finite.
    """

    def __init__(self):
        self.sums, self.shapes, self.count = None, None, 0

    def add(self, terms):
        flat = torch.cat([t.detach().float().reshape(-1) for t in terms.values()])
        if self.sums is None:
            self.sums = torch.zeros_like(flat)
            self.shapes = {k: t.numel() if t.dim() else 0 for k, t in terms.items()}
        self.sums += flat
        self.count += 1

    def read(self, step, out):
        if self.count == 0:
            return None
        sums = all_reduce_sum(self.sums.clone())          # the mean over ranks too
        values, i, result = (sums / (self.count * DIST.world)).tolist(), 0, {"step": step}
        for k, n in self.shapes.items():
            result[k] = values[i] if n == 0 else values[i:i + n]
            i += max(n, 1)
        check_finite({k: v for k, v in result.items() if isinstance(v, float)}, step, out)
        self.sums.zero_()
        self.count = 0
        return result


def parse_args(parser, argv=None):
    """parser.parse_args, also recording in `args.given` which options were typed, so that a
    resumed run overrides its saved settings only with flags the user actually passed."""
    args = parser.parse_args(argv)
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        args.given = sorted(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = defaults[a.dest]
    return args


def resume_args(args, state, flags):
    """The saved run's args; of `flags`, those typed on this command line replace them.
    --out, --resume and --device always come from the command line."""
    saved = dict(state["args"])
    typed = set(getattr(args, "given", ())) | {"out", "resume", "device"}
    saved.update({k: getattr(args, k) for k in flags if k in typed and hasattr(args, k)})
    saved["given"] = getattr(args, "given", [])
    return argparse.Namespace(**saved)


def resume_state(resume, out, kind):
    """Load the checkpoint that `--resume [PATH]` names (default: out/checkpoint.pt).

    When resuming from another file (say checkpoint.prev.pt after checkpoint.pt was damaged),
    the current checkpoint.pt is moved to checkpoint.replaced.pt first, so the next save does
    not rotate it over the good previous one.
    """
    current = Path(out) / "checkpoint.pt"
    path = current if resume is True else Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume, or "
                              "point --out at the run to continue")
    state = load_checkpoint(path)
    check_checkpoint_kind(state, path, kind)
    if DIST.main and current.exists() and path.resolve() != current.resolve():
        os.replace(current, current.with_name("checkpoint.replaced.pt"))
    return state


def load_state(module, state_dict, what, path):
    """load_state_dict with one clear sentence instead of a key dump on a mismatch."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} does not fit this {what} (different model or "
                              f"incompatible args): {first}") from None


# ----------------------------------------------------------------------------------------------
# Images and plots
# ----------------------------------------------------------------------------------------------
def save_grid(images, path, nrow=8, padding=2):
    """Save a (N, C, H, W) float batch in [0, 1] as one PNG grid."""
    torchvision.utils.save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow,
                        padding=padding, pad_value=0.5)


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
    fig.savefig(path, dpi=100)
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


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.start


class StopSignal:
    """Turn the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one exits.

    The training loop polls `requested` once per step, saves, and leaves cleanly.
    """

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:       # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        import signal
        if self.requested is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now without saving",
                  file=sys.stderr)
            raise SystemExit(130)
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint at the current step, then "
              "stopping (send it again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def save_labelled_rows(images, labels, path, gap_every=None):
    """Save a (rows, cols, C, H, W) float batch in [0, 1] as a grid with one text label per row.

    `gap_every` puts a wider gap after every that many columns (to separate seed images). One
    output pixel per image pixel.
    """
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
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Distributed data parallel (torchrun)
# ----------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


DIST = Distributed()           # this process's place; set by setup_distributed


def setup_distributed(device_name="auto"):
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set).

    NCCL with one GPU per local rank on CUDA, gloo on CPU. Without torchrun nothing changes.
    Returns (Distributed, device).
    """
    global DIST
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DIST, get_device(device_name)
    import torch.distributed as dist
    DIST = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", 0)))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", DIST.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DIST, device


def cleanup_distributed():
    """Tear the process group down on every rank together: a rank that destroys it while rank 0
    is still writing outputs can abort at exit ("terminate called without an active
    exception", seen with gloo under torchrun)."""
    if DIST.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not DIST.active:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(bool(flag))], device=device)).item())


def broadcast(tensor, src=0):
    """Rank `src`'s `tensor` on every rank, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.broadcast(tensor, src)
    return tensor


def should_stop(stop, step, log_every, device):
    """Whether to stop after this step on a SIGINT/SIGTERM. Under torchrun the ranks agree at
    log steps only (one small all-reduce), so that all of them save the same step."""
    if not DIST.active:
        return stop.requested is not None
    return step % log_every == 0 and any_rank(stop.requested, device)


def restore_rng(state):
    """This rank's RNG state from a checkpoint (`rng_ranks` under torchrun, else `rng`)."""
    rngs = state.get("rng_ranks") or [state["rng"]]
    set_rng_state(rngs[DIST.rank] if len(rngs) == DIST.world else rngs[0])


def barrier():
    if DIST.active:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj):
    """A list of `obj` from every rank (just [obj] in a single process)."""
    if not DIST.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * DIST.world
    dist.all_gather_object(out, obj)
    return out


class main_first:
    """Let rank 0 run a block first (building a data cache, say), then the other ranks."""

    def __enter__(self):
        if not DIST.main:
            barrier()

    def __exit__(self, *exc):
        if DIST.main and exc[0] is None:
            barrier()
        return False
