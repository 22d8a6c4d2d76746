"""Data loaders on fixtures written in the real on-disk formats, and the dSprites renderer."""
import math
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from conftest import write_idx

SHARED = Path(__file__).resolve().parents[2] / "shared"


# ---- MNIST: IDX files --------------------------------------------------------------------------
def test_mnist_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        imgs, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        sets[prefix] = imgs, labels
    train = utils.load_dataset("mnist", tmp_path, "train")
    test = utils.load_dataset("mnist", tmp_path, "test", limit=5)
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), sets["train"][0])
    assert np.array_equal(train.labels.numpy(), sets["train"][1])
    assert np.array_equal(test.images[:, 0].numpy(), sets["t10k"][0][:5])


# ---- CIFAR-10: pickle batches ------------------------------------------------------------------
def test_cifar10_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (7, 3072), dtype=np.uint8)   # rows: 1024 R, 1024 G, 1024 B
        labels = rng.integers(0, 10, 7).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(7)]}, f, protocol=2)
        batches[name] = data, labels
    train = utils.load_dataset("cifar10", tmp_path, "train")
    test = utils.load_dataset("cifar10", tmp_path, "test")
    assert train.images.shape == (35, 3, 32, 32) and test.images.shape == (7, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    first = train.images[7]                      # first image of the second batch
    assert np.array_equal(first[0].flatten().numpy(), data[0, :1024])        # red plane
    assert np.array_equal(first[2].flatten().numpy(), data[0, 2048:])        # blue plane
    assert train.labels[7:14].tolist() == labels


# ---- dSprites: the grid ------------------------------------------------------------------------
def test_dsprites_grid_and_index_order():
    classes = utils.dsprites_classes()
    assert classes.shape == (737280, 6)
    assert torch.equal(classes @ torch.tensor(utils.DSPRITES_STRIDES), torch.arange(737280))
    # posY varies fastest, then posX, orientation, scale, shape
    assert classes[1].tolist() == [0, 0, 0, 0, 0, 1]
    assert classes[32].tolist() == [0, 0, 0, 0, 1, 0]
    assert classes[245760].tolist() == [0, 1, 0, 0, 0, 0]
    values = utils.dsprites_values(classes[[0, 737279]])
    assert values[0].tolist() == pytest.approx([1, 1, 0.5, 0, 0, 0])
    assert values[1].tolist() == pytest.approx([1, 3, 1.0, 2 * math.pi, 1, 1])
    assert torch.unique(classes, dim=0).shape[0] == 737280


def test_dsprites_holdout_is_fixed_and_disjoint():
    test, train = utils.dsprites_split("test"), utils.dsprites_split("train")
    assert len(test) == 73728 and len(train) == 663552
    assert torch.equal(torch.sort(torch.cat([test, train])).values, torch.arange(737280))
    assert torch.equal(utils.dsprites_split("test"), test)


def parse_official_masks(path):
    masks, current = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"shape: (\w+), scale ([\d.]+).*cols (\d+)-", line)
        if m:
            current, c0 = (m[1], float(m[2])), int(m[3])
            masks[current] = np.zeros((64, 64), bool)
        elif current and re.match(r"\s*\d+ [.#]+$", line):
            row, pixels = line.split()
            for i, ch in enumerate(pixels):
                masks[current][int(row), c0 - 1 + i] = ch == "#"
    return masks


def render(shape, scale=5, orientation=0, x=0, y=0):
    return utils.render_dsprites(torch.tensor([[0, shape, scale, orientation, x, y]]))[0, 0]


@pytest.mark.skipif(not (SHARED / "dsprites_official_masks.txt").exists(),
                    reason="shared/dsprites_official_masks.txt is not beside the repository")
def test_dsprites_renderer_overlaps_official_masks():
    masks = parse_official_masks(SHARED / "dsprites_official_masks.txt")
    assert len(masks) == 4
    for (name, scale), official in masks.items():
        ours = render(utils.DSPRITES_SHAPES.index(name), scale=0 if scale == 0.5 else 5).numpy() > 0
        iou = (ours & official).sum() / (ours | official).sum()
        assert iou >= (0.9 if scale == 1.0 else 0.85), (name, scale, iou)


def test_dsprites_renderer_geometry():
    img = render(0).numpy() > 0                          # square, scale 1: 20x20 at centre 16
    rows, cols = np.nonzero(img)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 25, 6, 25)
    assert render(0, scale=0).sum() // 255 == 100          # scale 0.5: 10x10
    # both ends of the orientation grid are the same angle
    for shape in range(3):
        assert torch.equal(render(shape, 3, 0, 7, 20), render(shape, 3, 39, 7, 20))
    # the sprite centre is 16 + 32*pos pixels
    for k in (0, 13, 31):
        rows, cols = np.nonzero(render(1, 5, 0, k, 31 - k).numpy())
        assert abs(cols.mean() + 0.5 - (16 + 32 * k / 31)) < 0.5
        assert abs(rows.mean() + 0.5 - (16 + 32 * (31 - k) / 31)) < 0.5
    # rotation is counter-clockwise as displayed: after ~46 degrees the ellipse's long axis runs
    # from lower left to upper right, i.e. column grows as row (downwards) shrinks
    rows, cols = np.nonzero(render(1, 5, 5).numpy())
    assert np.corrcoef(rows, cols)[0, 1] < -0.5
    # the heart's lobes are up at orientation 0 and down after half a turn (index 19.5 ~ pi)
    for orientation, up in ((0, True), (20, False)):
        rows = np.nonzero(render(2, 5, orientation).numpy())[0]
        # the wide lobes pull the mass towards their side of the bounding box
        assert (rows.mean() < (rows.min() + rows.max()) / 2) == up
    assert set(np.unique(render(2, 2, 17, 3, 9).numpy())) == {0, 255}        # binary pixels


def test_dsprites_loader_renders_small_requests_without_a_cache(tmp_path):
    data = utils.load_dataset("dsprites", tmp_path, "train", limit=50)
    index = utils.dsprites_split("train")[:50]
    assert data.images.shape == (50, 1, 64, 64) and data.binary
    assert torch.equal(data.labels, utils.dsprites_classes(index))
    assert torch.equal(data.images, utils.render_dsprites(data.labels))
    assert not (tmp_path / "dsprites").exists()


def write_official_npz(path, marks):
    """The official npz layout, full size: imgs uint8 0/1 (737280, 64, 64), latents_classes,
    latents_values. Images are blank except `marks` {index: row}, where one row is lit."""
    n = 737280
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("imgs.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, 64, 64)})
            chunk = 65536
            for i in range(0, n, chunk):
                block = np.zeros((min(chunk, n - i), 64, 64), np.uint8)
                for idx, row in marks.items():
                    if i <= idx < i + chunk:
                        block[idx - i, row] = 1
                f.write(block.tobytes())
        classes = utils.dsprites_classes().numpy()
        for name, arr in (("latents_classes.npy", classes),
                          ("latents_values.npy", utils.dsprites_values(
                              utils.dsprites_classes()).double().numpy())):
            with zf.open(name, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr)


@pytest.mark.slow          # the official file is 737,280 images: a 3 GB conversion
def test_dsprites_uses_the_official_file_when_present(tmp_path):
    test_index = utils.dsprites_split("test")[:3].tolist()
    marks = {test_index[0]: 5, test_index[1]: 40, test_index[2]: 63}
    write_official_npz(tmp_path / utils.DSPRITES_FILE, marks)
    data = utils.load_dataset("dsprites", tmp_path, "test", limit=3)
    for i, row in enumerate(marks.values()):
        lit = torch.nonzero(data.images[i, 0].sum(1)).flatten().tolist()
        assert lit == [row] and data.images[i, 0, row].unique().tolist() == [255]
    assert (tmp_path / "dsprites" / utils.DSPRITES_OFFICIAL_CACHE).exists()


def test_official_file_in_the_wrong_order_is_refused(tmp_path):
    path = tmp_path / utils.DSPRITES_FILE
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("latents_classes.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros((10, 6), np.int64))
    with pytest.raises(utils.UserError, match="not a readable official dSprites file"):
        utils.load_dataset("dsprites", tmp_path, "test", limit=3)


# ---- batches -----------------------------------------------------------------------------------
def test_device_batches_are_seeded_permutations():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    b = utils.DeviceBatches(images, 10, "cpu", seed=3)
    seen = lambda ep, start=0: [(x * 255).round().long().flatten().tolist()
                                for x in b.epoch(ep, start)]
    e0, e1 = seen(0), seen(1)
    assert sorted(sum(e0, [])) == list(range(100)) and e0 != e1
    assert seen(0) == e0 and seen(0, 4) == e0[4:]               # deterministic, resumable
    shards = [utils.DeviceBatches(images, 10, "cpu", seed=3, rank=r, world=2) for r in (0, 1)]
    parts = [sum(([int(v) for v in (x * 255).round().flatten()] for x in s.epoch(0)), [])
             for s in shards]
    assert len(parts[0]) == len(parts[1]) == 50 and not set(parts[0]) & set(parts[1])


def test_too_few_images_for_a_batch_is_a_clear_error():
    with pytest.raises(utils.UserError, match="fewer than one batch"):
        utils.DeviceBatches(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), 8, "cpu")
