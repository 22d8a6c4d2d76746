"""Your own images: a folder of pictures read as a dataset (`--dataset folder --data-root DIR`).

utils.load_dataset reads a folder through `load_folder`; this module is the rest of that path:

- the layout: DIR/<class>/... (torchvision's ImageFolder: the class folders become binary
  attributes), a flat or nested folder, or DIR/train/ beside DIR/val/ (or valid/, test/) as
  the split; otherwise a fixed share of the images (--val-fraction) is held out, chosen by a
  seeded hash of each file's path, so it is the same on every run, on --resume, and when
  other images are added;
- the conversion of every image Pillow opens to uint8 pixels, in a stated way (`to_pixels`);
- the cache: decoded once, in parallel on every core, into a uint8 .npy under --cache-dir,
  never inside DIR (which may be read-only), keyed by the file list (names, sizes,
  modification times), the size and the channels; a changed folder rebuilds it, an
  interrupted build resumes;
- labels (--labels FILE): a CSV with a header of attribute names, one row per image path
  relative to DIR, values 1/0 or 1/-1; or CelebA's list_attr_celeba.txt layout.

Files that cannot be read (truncated, not an image, empty) are skipped and named; a folder
with no readable image is one line naming it.
"""
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from training import distributed, progress
from training.errors import DatasetNotFound, UserError
from training.files import building, replacing, write_json

HELD_OUT_FOLDERS = ("val", "valid", "validation", "test")
SPLIT_SEED = "20260101"         # salts the hash that holds images out: fixed, not --seed
VAL_FRACTION = 0.1
UNKNOWN = -1                    # an attribute an image has no label for (in neither group)
SHOWN_NAMES = 3                 # skipped files and label rows named in the one-line reports


def default_cache_dir():
    """$XDG_CACHE_HOME/pytorch-vae, else ~/.cache/pytorch-vae."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytorch-vae"


def image_extensions():
    """The file name endings Pillow opens (.jpg, .png, .gif, .webp, .tif, .bmp, ...)."""
    from PIL import Image
    return {ext.lower() for ext in Image.registered_extensions()}


# ----------------------------------------------------------------------------------------------
# The layout: which files, which split, which class
# ----------------------------------------------------------------------------------------------
def walk_images(folder, root):
    """Paths relative to `root` (posix) of the image files under `folder`, sorted; hidden
    files and folders (.DS_Store, .ipynb_checkpoints) are left out."""
    extensions = image_extensions()
    found = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(here, name).relative_to(root).as_posix())
    return sorted(found)


def class_folders(folder):
    """The class names of an ImageFolder layout: the subfolders of `folder` when it holds two
    or more and no image of its own; else [] (a flat or nested folder)."""
    extensions = image_extensions()
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and p.suffix.lower() in extensions for p in entries):
        return []
    subfolders = [p.name for p in entries if p.is_dir()]
    return subfolders if len(subfolders) >= 2 else []


def split_hash(path):
    """A number in [0, 1) fixed by the file's relative path (and SPLIT_SEED)."""
    digest = hashlib.sha1(f"{SPLIT_SEED}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def list_folder(root, val_fraction):
    """The layout of `root`: (files in cache order, held-out count, class of each file or None,
    class names, a description). Cache order: the held-out files, then the training files,
    each ordered by `split_hash`, so that either split is one contiguous block of the cache."""
    if not root.exists():
        raise DatasetNotFound(f"image folder {root} not found; --data-root names the folder "
                              "of your images")
    if not root.is_dir():
        raise UserError(f"--data-root {root} is a file, not a folder of images")
    held = next((root / n for n in HELD_OUT_FOLDERS if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held is not None:
        base, train = root / "train", walk_images(root / "train", root)
        test = walk_images(held, root)
        layout = f"{base.name}/ and {held.name}/ as the split"
    else:
        base = root / "train" if (root / "train").is_dir() else root
        everything = sorted(walk_images(base, root), key=split_hash)
        n_test = min(len(everything) - 1, max(1, round(val_fraction * len(everything))))
        test, train = everything[:n_test], everything[n_test:]
        layout = f"{val_fraction * 100:g}% of the images held out (fixed by their paths)"
    classes = class_folders(base)
    depth = len(base.relative_to(root).parts)       # train/ and val/ are one folder deep
    files = sorted(test, key=split_hash) + sorted(train, key=split_hash)
    of_class = [None] * len(files)
    for i, f in enumerate(files):                    # a file's class: its folder under base
        parts = Path(f).parts
        if len(parts) > depth + 1 and parts[depth] in classes:
            of_class[i] = parts[depth]
    if classes:
        layout = f"ImageFolder, {len(classes)} classes; {layout}"
    return files, len(test), of_class, classes, layout


def stamp_of(root, files, image_size, channels):
    """What a cache is made from: the resolved folder, every file's name, size and modification
    time (a digest), the size and the channels."""
    digest = hashlib.sha256()
    for f in files:
        st = (root / f).stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"folder": str(root.resolve()), "files": len(files), "digest": digest.hexdigest(),
            "size": image_size, "channels": channels}


# ----------------------------------------------------------------------------------------------
# Decoding: any image Pillow opens -> a centre square crop resized to S x S, uint8
# ----------------------------------------------------------------------------------------------
def to_pixels(img, channels):
    """An opened image as 8-bit RGB (`channels` 3) or grey (1), the stated way:

    - 16-bit and 32-bit integer grey ("I;16", "I") is scaled by 255/65535, rounded;
      float grey ("F") is clipped to 0-255;
    - transparency (RGBA, LA, a palette with a transparent entry) is composited onto white;
    - palette, bilevel, CMYK and other modes are converted to RGB by Pillow;
    - grey from colour is Pillow's "L" (ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B)."""
    from PIL import Image
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        values = values * (255 / 65535) if img.mode != "F" else values
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def decode_image(path, size, channels):
    """(C, S, S) uint8 of one file: EXIF orientation applied, the first frame of an animation,
    the centre square of side min(width, height) resized to `size` (bicubic, antialiased).
    JPEGs are decoded at the smallest DCT scale that keeps the square at least `size`."""
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        w, h = img.size
        scale = size / min(w, h)
        if img.format == "JPEG" and scale < 1:
            img.draft(img.mode, (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
        img = ImageOps.exif_transpose(img)
        img = to_pixels(img, channels)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize((size, size), Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side), reducing_gap=None)
        pixels = np.asarray(img)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_folder_chunk(job):
    """Worker (utils.build_image_cache): decode some files -> ((n, C, S, S) uint8, {index in the
    chunk: why it was skipped}). A file that cannot be read is skipped, never raised."""
    from PIL import Image
    paths, size, channels = job
    out = np.zeros((len(paths), channels, size, size), np.uint8)
    skipped = {}
    for i, path in enumerate(paths):
        try:
            out[i] = decode_image(path, size, channels)
        except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError,
                Image.DecompressionBombError) as e:
            why = str(e).replace(f" {path!r}", "").replace(path, "").strip()
            why = why.splitlines()[0][:120] if why else type(e).__name__
            skipped[i] = "empty file" if os.path.getsize(path) == 0 else why
    return out, skipped


# ----------------------------------------------------------------------------------------------
# The cache: decoded once, in parallel and resumably (CelebA's cache is built here too)
# ----------------------------------------------------------------------------------------------
class _InProcess:
    """The executor interface, run in this process (one chunk needs no worker pool)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs):
        return map(fn, jobs)

    def shutdown(self, **options):
        pass


def _ignore_sigint():
    """Worker processes leave Ctrl-C to the main process, which stops them (no tracebacks)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_image_cache(paths, decode, options, shape, cache, stamp, desc, chunk=1000,
                      workers=None):
    """Decode the images at `paths` once into `cache`, a `shape` uint8 .npy, in parallel on
    every core, resumably. Returns {row: why} of the images that `decode` skipped.

    `decode((paths, *options))` runs in a worker process and returns the chunk's rows, or
    (rows, {index in the chunk: why}) for files it skipped (their rows stay zero), or a
    string: an error that stops the build. Finished chunks are recorded beside the partial
    file with `stamp` (what the cache is made from), so an interrupted build of the same files
    continues; `stamp` is written to cache.json before the cache appears. The caller holds the
    folder's build lock, so one process at a time writes the partial file.
    """
    from concurrent.futures import ProcessPoolExecutor
    n = shape[0]
    partial = cache.with_name(cache.stem + ".partial.npy")
    ledger = cache.with_name(cache.stem + ".progress.json")
    done, skipped = set(), {}
    if partial.exists() and ledger.exists():
        try:
            meta = json.loads(ledger.read_text())
            arr = np.load(partial, mmap_mode="r+")
            if meta["files"] == n and arr.shape == tuple(shape) and arr.dtype == np.uint8 \
                    and meta.get("stamp", {}) == stamp:
                done = set(meta["done"])
                skipped = {int(k): v for k, v in meta.get("skipped", {}).items()}
        except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            done = set()             # unreadable: start over
    if not done:
        skipped = {}
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))   # no symlink
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=tuple(shape))
    todo = [i for i in range(0, n, chunk) if i not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    jobs = [(paths[i:i + chunk], *options) for i in todo]
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint) if workers > 1 \
        else _InProcess()
    try:
        with progress.bar(total=n, initial=n - sum(min(chunk, n - i) for i in todo),
                          desc=desc, unit="image") as bar:
            for i, result in zip(todo, pool.map(decode, jobs)):
                if isinstance(result, str):
                    raise UserError(result)
                block, bad = result if isinstance(result, tuple) else (result, {})
                arr[i:i + len(block)] = block
                arr.flush()
                done.add(i)
                skipped.update({i + j: why for j, why in bad.items()})
                write_json(ledger, {"files": n, "done": sorted(done), "skipped": skipped,
                                    "stamp": stamp})
                bar.update(len(block))
    finally:
        pool.shutdown(cancel_futures=True)     # on Ctrl-C, the chunks not started are dropped
    del arr
    write_json(cache.with_suffix(".json"), {**stamp, "skipped": skipped} if skipped else stamp)
    os.replace(partial, cache)
    ledger.unlink()
    return skipped


def cache_folder(cache_dir, root):
    """The cache's folder for `root`: one per image folder, named by it and its path's hash."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.resolve().name)
    return Path(cache_dir) / "folders" / f"{name or 'root'}-{key}"


def read_stamp(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_cache(root, files, image_size, channels, folder, stamp):
    """The folder's cache `folder`/{S}px_{C}ch.npy (C: 3 unless --channels 1) and its record:
    {**stamp, "kept": the files in its rows, "skipped": {file: why}, "grey": every image
    has equal channels}. Decoded into a .decoded.npy first (resumable); files that were
    skipped are then dropped from the rows, so that each split stays a contiguous block."""
    final = folder / f"{image_size}px_{channels}ch.npy"
    record = final.with_suffix(".json")
    if final.exists() and (read_stamp(record) or {}).get("stamp") == stamp:
        return final, read_stamp(record)
    with building(folder, f"the image cache {final}"):
        if final.exists() and (read_stamp(record) or {}).get("stamp") == stamp:
            return final, read_stamp(record)           # built by another process meanwhile
        decoded = final.with_name(final.stem + ".decoded.npy")
        shape = (len(files), channels, image_size, image_size)
        done = read_stamp(decoded.with_suffix(".json"))
        if decoded.exists() and done is not None and \
                {k: v for k, v in done.items() if k != "skipped"} == stamp:
            skipped = {int(k): v for k, v in done.get("skipped", {}).items()}
        else:
            decoded.unlink(missing_ok=True)
            skipped = build_image_cache(
                [str(root / f) for f in files], decode_folder_chunk, (image_size, channels),
                shape, decoded, stamp, f"decoding {root} into {folder}", chunk=256)
        arr = np.load(decoded, mmap_mode="r")
        kept = [i for i in range(len(files)) if i not in skipped]
        grey = channels == 3
        with replacing(final, ".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(kept), *shape[1:]))
            for start in range(0, len(kept), 4096):
                rows = arr[kept[start:start + 4096]]
                out[start:start + len(rows)] = rows
                if grey:
                    grey = bool((rows[:, 0] == rows[:, 1]).all() and
                                (rows[:, 0] == rows[:, 2]).all())
            out.flush()
            del out
        del arr
        result = {"stamp": stamp, "kept": [files[i] for i in kept],
                  "skipped": {files[i]: why for i, why in sorted(skipped.items())},
                  "grey": grey}
        write_json(record, result)
        decoded.unlink()
        decoded.with_suffix(".json").unlink(missing_ok=True)
    return final, result


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------
def parse_label(value, path, line):
    if value in ("1", "+1"):
        return 1
    if value in ("0", "-1"):
        return 0
    raise UserError(f"{path} line {line}: {value!r} is not a label; use 1 and 0, or 1 and -1")


def read_labels(path):
    """(attribute names, {image path relative to DIR: (F,) int8 in {0, 1}}) of a labels file:
    a CSV whose header names the attributes after the path column; or CelebA's
    list_attr_celeba.txt layout (a count, the names, then 'file v v ...' split by spaces)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the labels file {path}: {e}") from None
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first.isdigit():                              # CelebA: count, names, rows
        names = lines[1].split() if len(lines) > 1 else []
        rows = [(i + 1, line.split()) for i, line in enumerate(lines) if i >= 2 and line.strip()]
        if len(rows) != int(first):
            raise UserError(f"{path}: line 1 promises {int(first)} rows, found {len(rows)}")
    else:
        table = list(csv.reader(lines))
        names = [n.strip() for n in table[0][1:]] if table else []
        rows = [(i + 1, [v.strip() for v in r]) for i, r in enumerate(table)
                if i >= 1 and any(v.strip() for v in r)]
    if not names:
        raise UserError(f"{path} names no attribute: its header should be the path column, "
                        "then one name per attribute")
    labels = {}
    for line, row in rows:
        if len(row) != len(names) + 1:
            raise UserError(f"{path} line {line}: {len(row) - 1} values for {len(names)} "
                            "attributes")
        image = row[0].replace("\\", "/").removeprefix("./")
        if image in labels:
            raise UserError(f"{path} line {line}: {image} has a row already")
        labels[image] = np.array([parse_label(v, path, line) for v in row[1:]], np.int8)
    return names, labels


def attribute_table(kept, of_class, classes, labels_file, root):
    """(N, F) int8 attributes of the `kept` files and their names: one binary attribute per
    class folder, then the columns of `labels_file`; UNKNOWN where a file has no row. Prints
    the rows of the file that name no image that was read, counted, with the first few."""
    names = list(classes)
    columns = []
    if classes:
        columns.append(np.array([[int(c == k) for k in classes] for c in of_class], np.int8))
    if labels_file is not None:
        file_names, rows = read_labels(labels_file)
        clash = sorted(set(file_names) & set(names))
        if clash:
            raise UserError(f"{labels_file} names {', '.join(clash)}, which is also a class "
                            f"folder of {root}; rename one of them")
        present = set(kept)
        unknown = np.full(len(file_names), UNKNOWN, np.int8)
        columns.append(np.stack([rows.get(f, unknown) for f in kept]))
        missing = [f for f in rows if f not in present]
        unlabelled = sum(f not in rows for f in kept)
        if distributed.DIST.main and (missing or unlabelled):
            said = []
            if missing:
                said.append(f"{len(missing):,} rows name images that are not in {root} or were "
                            f"skipped ({', '.join(missing[:SHOWN_NAMES])}"
                            f"{', ...' if len(missing) > SHOWN_NAMES else ''})")
            if unlabelled:
                said.append(f"{unlabelled:,} images have no row (their attributes are unknown "
                            "and they join neither group of an attribute vector)")
            print(f"labels in {labels_file}: {'; '.join(said)}")
        names += file_names
    if not columns:
        return None, []
    return torch.from_numpy(np.concatenate(columns, 1)), names


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------
def load_folder(root, split, limit=None, image_size=64, channels=None, labels=None,
                cache_dir=None, val_fraction=VAL_FRACTION):
    """A split ('train' or 'test') of the images under `root`: (images, a view of the
    memory-mapped cache; (N, F) attributes or None; their names; the files, relative to
    `root`), which utils.load_dataset makes an ImageSet. `channels` None: 1 when every
    image is grey, else 3."""
    root = Path(root)
    if split not in ("train", "test"):
        raise UserError(f"a folder has the splits 'train' and 'test' (its held-out images), "
                        f"not {split!r}")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    try:
        files, n_test, of_class, classes, layout = list_folder(root, val_fraction)
        stamp = stamp_of(root, files, image_size, 1 if channels == 1 else 3)
    except OSError as e:                    # unreadable, or a file gone while listing
        raise UserError(f"cannot read the image folder {root}: {e.strerror or e}"
                        f"{f' ({e.filename})' if e.filename else ''}") from None
    if len(files) < 2:
        raise UserError(f"no images in {root}: found {len(files)} image file"
                        f"{'' if len(files) == 1 else 's'} (.jpg, .png, .gif, .bmp, .tif, .webp "
                        "or another that Pillow opens) in it and its subfolders; at least 2 "
                        "are needed (one to train on, one to hold out)")
    stored = stamp["channels"]
    folder = cache_folder(cache_dir or default_cache_dir(), root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path, record = build_cache(root, files, image_size, stored, folder, stamp)
    except OSError as e:
        raise UserError(f"cannot write the image cache in {folder}: {e.strerror or e}; choose "
                        "another --cache-dir") from None
    kept, skipped = record["kept"], record["skipped"]
    if not kept:
        named = "; ".join(f"{f}: {w}" for f, w in list(skipped.items())[:SHOWN_NAMES])
        raise UserError(f"no readable image in {root}: all {len(files):,} image files were "
                        f"skipped, e.g. {named}")
    index = {f: i for i, f in enumerate(files)}
    test_rows = sum(index[f] < n_test for f in kept)       # the held-out block comes first
    rows = slice(0, test_rows) if split == "test" else slice(test_rows, len(kept))
    if rows.stop == rows.start:
        raise UserError(f"the {'held-out' if split == 'test' else 'training'} split of {root} "
                        "holds no readable image")
    if limit is not None:
        rows = slice(rows.start, min(rows.stop, rows.start + limit))
    grey = channels is None and record["grey"]
    arr = np.load(path, mmap_mode="c")             # copy-on-write: writable, the file never is
    images = torch.from_numpy(arr[rows, :1] if grey else arr[rows])
    attrs, names = attribute_table(kept, [of_class[index[f]] for f in kept], classes, labels,
                                   root)
    if distributed.DIST.main and split == "train":
        c = images.shape[1]
        said = f"{c} channel{'s' if c > 1 else ''}" + (" (every image grey)" if grey else "")
        print(f"folder {root}: {layout}; {len(kept) - test_rows:,} training and {test_rows:,} "
              f"held-out images at {image_size} px, {said}; cache {path}")
        if skipped:
            shown = "; ".join(f"{f} ({w})" for f, w in list(skipped.items())[:SHOWN_NAMES])
            print(f"skipped {len(skipped):,} unreadable file{'s' if len(skipped) > 1 else ''} "
                  f"of {root}: {shown}{'; ...' if len(skipped) > SHOWN_NAMES else ''}")
    return images, None if attrs is None else attrs[rows], names, kept[rows]
