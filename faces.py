"""Synthetic faces in the official CelebA layout, for the tests, bench.py and measuring attribute
arithmetic.

Every face is drawn on a 178x218 canvas (the size of img_align_celeba) with a background, hair,
skin tone, position and size of its own. Two attributes are visible and independent:
- Smiling: an open, curved mouth showing teeth; otherwise a closed, straight mouth.
- Eyeglasses: dark frames around both eyes and a bridge.
Male (a beard shadow) varies too; the other 37 attributes are random labels with no pixels.

    python faces.py --n 3000 --root data/faces       # -> data/faces/celeba/...
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young").split()
SKIN = ((255, 224, 196), (234, 192, 160), (198, 146, 110), (141, 95, 70), (95, 62, 45))
HAIR = ((20, 15, 10), (90, 55, 30), (200, 170, 100), (150, 150, 150), (120, 40, 20))


def draw_face(rng, smiling, glasses, male):
    """One 178x218 RGB face (uint8 array). The 148x148 centre crop holds the whole face."""
    img = Image.new("RGB", (178, 218), tuple(int(c) for c in rng.integers(40, 220, 3)))
    d = ImageDraw.Draw(img)
    cx, cy = 89 + rng.integers(-5, 6), 112 + rng.integers(-5, 6)
    w, h = 40 + rng.integers(-3, 4), 52 + rng.integers(-3, 4)           # face semi-axes
    skin = SKIN[rng.integers(len(SKIN))]
    hair = HAIR[rng.integers(len(HAIR))]
    d.ellipse([cx - w - 6, cy - h - 10, cx + w + 6, cy + h - 20], fill=hair)
    d.ellipse([cx - w, cy - h + 8, cx + w, cy + h], fill=skin)
    if male:                                                           # beard shadow
        shade = tuple(int(c * 0.8) for c in skin)
        d.chord([cx - w + 6, cy, cx + w - 6, cy + h], 0, 180, fill=shade)
    ex, ey = 16, cy - 6                                                 # eyes
    for x in (cx - ex, cx + ex):
        d.ellipse([x - 5, ey - 4, x + 5, ey + 4], fill=(255, 255, 255))
        d.ellipse([x - 3, ey - 3, x + 3, ey + 3], fill=(30, 30, 60))
    if glasses:                                                         # frames and bridge
        for x in (cx - ex, cx + ex):
            d.rectangle([x - 12, ey - 9, x + 12, ey + 9], outline=(10, 10, 10), width=3)
        d.line([cx - ex + 12, ey, cx + ex - 12, ey], fill=(10, 10, 10), width=3)
    my = cy + 28                                                        # mouth
    if smiling:           # open and curved: the lower half of an ellipse, teeth along the top
        d.chord([cx - 18, my - 12, cx + 18, my + 14], 0, 180, fill=(90, 10, 20))
        d.rectangle([cx - 15, my + 1, cx + 15, my + 5], fill=(250, 250, 250))
    else:                 # closed and straight
        d.line([cx - 13, my + 2, cx + 13, my + 2], fill=(140, 40, 50), width=4)
    return np.asarray(img)


def write_faces(root, n, seed=0, split=(0.8, 0.1)):
    """Write `n` faces as <root>/celeba/img_align_celeba/000001.jpg... with list_attr_celeba.txt
    and list_eval_partition.txt in the exact official formats. Returns the 0/1 attributes
    (n, 40) and the file names."""
    folder = Path(root) / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = rng.integers(0, 2, size=(n, len(ATTRIBUTES)))
    smiling, glasses, male = (ATTRIBUTES.index(a) for a in ("Smiling", "Eyeglasses", "Male"))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(files):
        face = draw_face(rng, attrs[i, smiling], attrs[i, glasses], attrs[i, male])
        Image.fromarray(face).save(images / name, quality=92)
    signed = 2 * attrs - 1
    lines = [str(n), " ".join(ATTRIBUTES) + " "]
    lines += [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, signed)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    n_train, n_valid = int(split[0] * n), int(split[1] * n)
    partition = [0] * n_train + [1] * n_valid + [2] * (n - n_train - n_valid)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(files, partition)))
    return attrs, files


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="faces to write")
    p.add_argument("--root", required=True, help="data root; the faces go to ROOT/celeba")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_faces(a.root, a.n, a.seed)
    print(f"wrote {a.n} faces to {Path(a.root) / 'celeba'}")
