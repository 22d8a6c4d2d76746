"""--dataset folder: your own images in every layout and format Pillow opens, their labels, the
cache kept outside the folder, bad files skipped and named; batches from host memory or the
device, the same losses either way, and the memory check that chooses between them."""
import io
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import beta_vae_analyze as ba
import image_folders
import standard_vae as sv
import utils
from conftest import first_phase
from training.errors import DatasetNotFound, UserError


def save(path, pixels, **options):
    """Write uint8 `pixels` (H, W) or (H, W, C) as the image file `path` (its format from the
    suffix), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, **options)
    return path


def blob(i, size=(24, 30), grey=False):
    """An image of its own colour per index, with a darker square in its centre."""
    colour = (40 + 9 * i % 200, 200 - 7 * i % 180, 90 + 5 * i % 150)
    img = np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)
    h, w = size
    img[h // 2 - 3:h // 2 + 3, w // 2 - 3:w // 2 + 3] //= 2
    return img[..., 0] if grey else img


def image_folder(root, classes=("cat", "dog"), per_class=10, grey=False, suffix=".png"):
    """root/<class>/<i><suffix>: an ImageFolder."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            save(root / name / f"{i:03d}{suffix}", blob(c * per_class + i, grey=grey))
    return root


def listing(root):
    """Every file and folder under `root` with its size and modification time (ns)."""
    out = {}
    for here, dirs, names in os.walk(root):
        for n in dirs + names:
            st = os.stat(os.path.join(here, n))
            out[os.path.relpath(os.path.join(here, n), root)] = (st.st_size, st.st_mtime_ns)
    st = os.stat(root)
    out["."] = (st.st_size, st.st_mtime_ns)
    return out


def load(root, split, cache, **options):
    return utils.load_dataset("folder", root, split, cache_dir=cache, **options)


# ---- layouts -----------------------------------------------------------------------------------
def test_image_folder_classes_become_binary_attributes(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=10)
    train = load(root, "train", tmp_path / "cache", image_size=32)
    test = load(root, "test", tmp_path / "cache", image_size=32)
    assert (len(train), len(test)) == (18, 2)            # 0.1 of 20 held out
    assert train.images.shape == (18, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.label_names == ["cat", "dog"] and train.mapped
    for data in (train, test):
        for f, row in zip(data.files, data.labels.tolist()):
            assert row == ([1, 0] if f.startswith("cat/") else [0, 1])
    assert not set(train.files) & set(test.files)
    # each image is its own file's centre square, resized: its colour survives
    i = train.files.index("dog/004.png")
    mean = train.images[i].float().mean((1, 2))
    assert torch.allclose(mean, torch.tensor(blob(14)[:, 3:27].reshape(-1, 3).mean(0),
                                             dtype=torch.float), atol=4)


def test_nested_flat_folder_has_no_classes_and_a_fixed_held_out_share(tmp_path):
    root = tmp_path / "photos"
    names = [f"{y}/{m}/img{i}.png" for y in (2019, 2020) for m in ("jan", "feb")
             for i in range(5)] + ["top.png"]
    for i, name in enumerate(names):
        save(root / name, blob(i))
    train = load(root, "train", tmp_path / "c", image_size=32, val_fraction=0.25)
    test = load(root, "test", tmp_path / "c", image_size=32, val_fraction=0.25)
    assert train.labels is None and train.label_names == []
    assert sorted(train.files + test.files) == sorted(names) and len(test) == 5
    # the held-out share depends on each file's path only: the same on every load, and adding
    # images moves no image between the splits
    save(root / "2021" / "new.png", blob(99))
    again = load(root, "test", tmp_path / "c", image_size=32, val_fraction=0.25)
    assert len(again) == 6 and set(test.files) <= set(again.files)
    assert not set(again.files) & set(load(root, "train", tmp_path / "c", image_size=32,
                                           val_fraction=0.25).files)


def test_train_and_val_folders_are_the_split(tmp_path):
    root = tmp_path / "data"
    image_folder(root / "train", per_class=4)
    image_folder(root / "val", per_class=2)
    train = load(root, "train", tmp_path / "c", image_size=32)
    test = load(root, "test", tmp_path / "c", image_size=32)
    assert sorted(train.files) == sorted(f"train/{c}/{i:03d}.png" for c in ("cat", "dog")
                                         for i in range(4))
    assert sorted(test.files) == sorted(f"val/{c}/{i:03d}.png" for c in ("cat", "dog")
                                        for i in range(2))
    assert test.label_names == ["cat", "dog"]
    assert [r[0] for r in test.labels.tolist()] == [int(f.startswith("val/cat"))
                                                    for f in test.files]
    assert len(load(root, "train", tmp_path / "c", limit=3, image_size=32)) == 3


# ---- formats -----------------------------------------------------------------------------------
def test_every_kind_of_png_and_an_exif_rotated_jpeg_are_converted_as_stated(tmp_path):
    root = tmp_path / "formats"
    save(root / "grey.png", np.full((16, 16), 77))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200                                  # red, but fully transparent on the left
    rgba[:, 8:, 3] = 255
    save(root / "rgba.png", rgba)
    palette = Image.new("P", (16, 16))
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.save(root / "palette.png")
    sixteen = np.full((16, 16), 32896, np.uint16)       # 32896 / 257 = 128 in 8 bits
    Image.fromarray(sixteen).save(root / "sixteen.png")
    assert Image.open(root / "sixteen.png").mode.startswith("I")
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :24] = (255, 0, 0)                        # stored: red left half, blue right half
    stored[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # shown rotated 90 degrees clockwise
    Image.fromarray(stored).save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 255, 0), (255, 0, 255))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])

    data = load(root, "train", tmp_path / "c", image_size=16, val_fraction=0.01)
    test = load(root, "test", tmp_path / "c", image_size=16, val_fraction=0.01)
    images = dict(zip(data.files + test.files, torch.cat([data.images, test.images])))
    assert images["grey.png"].unique().tolist() == [77]                     # grey copied to RGB
    assert images["rgba.png"][:, :, :6].unique().tolist() == [255]          # on white
    assert images["rgba.png"][:, :, 10:].flatten(1).float().mean(1).round().tolist() == [200, 0, 0]
    assert images["palette.png"][:, 0, 0].tolist() == [10, 20, 30]
    assert images["sixteen.png"].unique().tolist() == [128]
    rot = images["rotated.jpg"].float()                 # EXIF applied: red on top, not left
    assert rot[0, :6].mean() > 200 and rot[2, :6].mean() < 40
    assert rot[2, 10:].mean() > 200 and rot[0, 10:].mean() < 40
    gif = images["animated.gif"].float().mean((1, 2))   # the first frame: green
    assert gif[1] > 200 and gif[0] < 40
    grey = load(root, "train", tmp_path / "c", image_size=16, channels=1, val_fraction=0.01)
    assert grey.images.shape[1] == 1


def test_channels_are_one_when_every_image_is_grey(tmp_path):
    root = image_folder(tmp_path / "digits", per_class=3, grey=True)
    data = load(root, "train", tmp_path / "c", image_size=32)
    assert data.images.shape[1] == 1
    assert load(root, "train", tmp_path / "c", image_size=32, channels=3).images.shape[1] == 3
    save(root / "cat" / "colour.png", blob(5))
    assert load(root, "train", tmp_path / "c", image_size=32).images.shape[1] == 3


def test_bad_files_are_skipped_and_named_in_one_line(tmp_path, capsys):
    root = image_folder(tmp_path / "pets", per_class=6, suffix=".jpg")
    good = io.BytesIO()
    Image.fromarray(blob(3, size=(64, 64))).save(good, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("not an image at all\n")
    (root / "dog" / "readme.txt").write_text("ignored: not an image by its name\n")
    train = load(root, "train", tmp_path / "c", image_size=32)
    test = load(root, "test", tmp_path / "c", image_size=32)
    assert len(train) + len(test) == 12
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith("skipped 3 unreadable files")
    for name in ("cat/truncated.jpg", "dog/empty.jpg (empty file)", "dog/notes.jpg"):
        assert name in lines[0]
    assert "readme" not in lines[0]


def test_missing_or_unreadable_folders_are_one_line_naming_the_path(tmp_path):
    with pytest.raises(DatasetNotFound, match=f"image folder {tmp_path / 'nowhere'} not found"):
        load(tmp_path / "nowhere", "train", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no images in {tmp_path / 'empty'}"):
        load(tmp_path / "empty", "train", tmp_path / "c")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=f"no readable image in {bad}: all 3") as e:
        load(bad, "train", tmp_path / "c")
    assert "\n" not in str(e.value)


# ---- the cache ---------------------------------------------------------------------------------
def test_cache_is_reused_rebuilt_when_the_folder_changes_and_kept_outside_it(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=5)
    cache = tmp_path / "cache"
    before = listing(root)
    load(root, "train", cache, image_size=32)
    assert listing(root) == before                       # nothing written inside the folder
    (npy,) = cache.glob("folders/pets-*/32px_3ch.npy")
    built = npy.stat().st_mtime_ns
    load(root, "test", cache, image_size=32)
    assert npy.stat().st_mtime_ns == built               # reused
    save(root / "dog" / "new.png", blob(40))             # a file added: rebuilt
    assert len(load(root, "train", cache, image_size=32)) + \
        len(load(root, "test", cache, image_size=32)) == 11
    rebuilt = npy.stat().st_mtime_ns
    assert rebuilt != built
    os.utime(root / "cat" / "000.png", ns=(1, 1))       # a file touched: rebuilt
    load(root, "train", cache, image_size=32)
    assert npy.stat().st_mtime_ns != rebuilt
    assert (cache / "folders").exists() and not list(root.rglob("*.npy"))


def test_interrupted_folder_build_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "pets", per_class=300)        # 600 images: 3 chunks
    cache = tmp_path / "cache"
    calls = []
    decode = image_folders.decode_folder_chunk

    def stop_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(job[0]))
        return decode(job)

    monkeypatch.setattr(image_folders, "decode_folder_chunk", stop_after_two)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)             # decode in this process
    with pytest.raises(KeyboardInterrupt):
        load(root, "train", cache, image_size=16)
    assert calls == [256, 256] and list(cache.glob("folders/*/16px_3ch.decoded.partial.npy"))
    calls.clear()
    monkeypatch.setattr(image_folders, "decode_folder_chunk", lambda job: calls.append(
        len(job[0])) or decode(job))
    data = load(root, "train", cache, image_size=16)
    assert calls == [88] and len(data) == 540                    # the last chunk only


# ---- labels ------------------------------------------------------------------------------------
def test_labels_csv_and_celeba_layout_join_the_class_attributes(tmp_path, capsys):
    root = image_folder(tmp_path / "pets", per_class=5)
    rows = [f"{c}/{i:03d}.png,{1 if i % 2 else 0},{1 if i < 2 else -1}"
            for c in ("cat", "dog") for i in range(5) if (c, i) != ("dog", 4)]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,Striped,Young\n" + "\n".join(rows + ["cat/gone.png,1,1"]) + "\n")
    data = load(root, "train", tmp_path / "c", image_size=32, labels=csv)
    test = load(root, "test", tmp_path / "c", image_size=32, labels=csv)
    assert data.label_names == ["cat", "dog", "Striped", "Young"]
    for f, row in zip(data.files + test.files, torch.cat([data.labels, test.labels]).tolist()):
        i = int(f[4:7])
        want = [-1, -1] if f == "dog/004.png" else [i % 2, int(i < 2)]
        assert row == [int(f.startswith("cat")), int(f.startswith("dog"))] + want, f
    out = capsys.readouterr().out
    assert "1 rows name images that are not in" in out and "cat/gone.png" in out
    assert "1 images have no row" in out
    txt = tmp_path / "list_attr.txt"                     # CelebA's layout: count, names, rows
    txt.write_text("2\nStriped Young \ncat/000.png -1  1\ncat/001.png  1 -1\n")
    data = load(root, "train", tmp_path / "c", image_size=32, labels=txt)
    both = dict(zip(data.files + test.files,
                    torch.cat([data.labels, load(root, "test", tmp_path / "c", image_size=32,
                                                 labels=txt).labels]).tolist()))
    assert both["cat/000.png"][2:] == [0, 1] and both["cat/001.png"][2:] == [1, 0]


def test_bad_labels_are_refused_with_their_line_or_listed(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=5)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,Striped\ncat/000.png,1\ncat/001.png,yes\n")
    with pytest.raises(UserError, match=r"bad.csv line 3: 'yes' is not a label"):
        load(root, "train", tmp_path / "c", labels=bad)
    bad.write_text("path,Striped\ncat/000.png,1,0\n")
    with pytest.raises(UserError, match="line 2: 2 values for 1 attributes"):
        load(root, "train", tmp_path / "c", labels=bad)
    good = tmp_path / "good.csv"
    good.write_text("path,Striped\n" + "".join(f"cat/{i:03d}.png,{i % 2}\n" for i in range(5)))
    data = load(root, "train", tmp_path / "c", labels=good)
    with pytest.raises(UserError, match="unknown attribute 'Spotted' for folder; valid: cat, "
                                        "dog, Striped"):
        ba.attribute_groups(data, "Spotted")
    positive, negative = ba.attribute_groups(data, "Striped")       # the dogs have no row
    assert [data.files[i] for i in torch.nonzero(positive).flatten()] == \
        [f for f in data.files if f in ("cat/001.png", "cat/003.png")]
    assert all(f.startswith("cat") for f in np.array(data.files)[negative.numpy()])
    positive, negative = ba.attribute_groups(data, "dog")
    assert positive.sum() + negative.sum() == len(data)


# ---- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_every_script_takes_32_to_256_px(size):
    import beta_vae as bv
    import vq_vae as vq
    layers = {32: 3, 64: 4, 128: 5, 256: 6}[size]           # a stride-2 layer per doubling
    assert len(sv.default_widths(size)) == layers
    x = torch.rand(2, 3, size, size)
    for module in (sv, bv):
        args = module.check_args(module.parse_args(["--dataset", "folder", "--image-size",
                                                    str(size), "--latent", "4"]))
        model = module.build_model(args, 3, size)
        logits, mu, _ = model(x)
        assert logits.shape == x.shape and mu.shape == (2, 4)
    if size == 128:                                       # CelebA at 128 px too
        args = sv.check_args(sv.parse_args(["--dataset", "celeba", "--image-size", "128"]))
        assert sv.build_model(args, 3, 128)(x)[0].shape == x.shape
    args = vq.check_args(vq.parse_args(["--dataset", "folder", "--image-size", str(size),
                                        "--hidden", "16", "--res-hidden", "8", "--latent", "8"]))
    recon, _ = vq.build_model(args, 3)(x)[:2]
    assert recon.shape == x.shape


# ---- end to end --------------------------------------------------------------------------------
def tiny(root, cache, out, *extra):
    return ["--dataset", "folder", "--data-root", root, "--cache-dir", cache, "--image-size",
            32, "--batch-size", 8, "--max-steps", 6, "--log-every", 2, "--eval-limit", 8,
            "--device", "cpu", "--precision", "fp32", "--out", out, *extra]


def test_a_run_on_a_read_only_folder_then_an_attribute_vector_from_its_csv(tmp_path, cli):
    root = image_folder(tmp_path / "pets", per_class=20)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,Odd\n" + "".join(f"{c}/{i:03d}.png,{i % 2}\n" for c in ("cat", "dog")
                                          for i in range(20)))
    modes = {}
    for here, dirs, names in os.walk(root):                 # read-only, as a shared mount
        for n in dirs + names + [""]:
            p = os.path.join(here, n)
            modes[p] = os.stat(p).st_mode
            os.chmod(p, modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = listing(root)
    try:
        run = cli("beta_vae.py", *tiny(root, tmp_path / "cache", tmp_path / "run", "--labels",
                                       csv, "--latent", 4))
        assert "ImageFolder, 2 classes" in run.stdout and "36 training and 4 held-out" in run.stdout
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["steps"] == 6 and metrics["train_images"] == 36
        proc = cli("beta_vae_analyze.py", "--checkpoint", tmp_path / "run" / "checkpoint.pt",
                   "--attribute", "dog", "--n-show", 2, "--strengths", "0,1", "--precision",
                   "fp32")
        assert "dog: vector from 18 images with and 18 without" in proc.stdout
        record = json.loads((tmp_path / "run" / "attribute_dog.json").read_text())
        assert record["train_with"] == 18 and record["effect"]["held_out_with"] + \
            record["effect"]["held_out_without"] == 4
        proc = cli("beta_vae_analyze.py", "--checkpoint", tmp_path / "run" / "checkpoint.pt",
                   "--attribute", "Odd", "--condition", "cat=1", "--n-show", 1, "--strengths",
                   "1", "--precision", "fp32")
        assert "Odd: vector from 9 images with and 9 without" in proc.stdout
        assert listing(root) == before                      # sizes and mtimes, files and folders
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)


# ---- host or device: the same batches, the memory check ----------------------------------------
def test_host_batches_are_the_device_batches(tmp_path):
    images = torch.randint(0, 256, (103, 1, 4, 4), dtype=torch.uint8)
    device = utils.DeviceBatches(images, 10, "cpu", seed=5, rank=1, world=2)
    host = utils.HostBatches(images, 10, "cpu", seed=5, rank=1, world=2)
    for epoch, start in ((0, 0), (3, 2)):
        a, b = list(device.epoch(epoch, start)), list(host.epoch(epoch, start))
        assert len(a) == len(b) == 5 - start and all(torch.equal(x, y) for x, y in zip(a, b))
    first = next(iter(host.epoch(1)))                  # a loop that leaves an epoch early
    assert torch.equal(first, next(iter(device.epoch(1))))


def test_the_same_seed_trains_identically_from_host_memory_and_from_the_device(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=20)
    logs = {}
    for where in ("device", "host"):
        args = sv.parse_args(list(map(str, tiny(root, tmp_path / "cache", tmp_path / where,
                                                "--data-on", where, "--iw-samples", 0))))
        model, settings, trained = first_phase(sv.main, args)
        logs[where] = trained.log
    assert len(logs["host"]) == 3 and logs["host"] == logs["device"]


GB = 10**9


def test_memory_check_switches_to_host_batches_or_refuses_on_a_2_gb_card(monkeypatch, capsys):
    split = torch.empty(162_770, 3, 128, 128, dtype=torch.uint8, device="meta")   # 8.0 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GB, 8 * GB))
    monkeypatch.setattr(utils, "host_memory_available", lambda: 24 * GB)
    where, why = utils.choose_placement(split, "cuda", "auto")
    assert where == "host" and "8.0 GB" in why and "2.0 GB free on cuda" in why
    batches = utils.training_batches(split, 64, "cuda", data_on="auto")
    assert isinstance(batches, utils.HostBatches) and why in capsys.readouterr().out
    with pytest.raises(UserError) as e:                       # told to hold it on the card
        utils.choose_placement(split, "cuda", "device")
    assert "8.0 GB: 162,770 images of 3x128x128" in str(e.value) and "2.0 GB free" in str(e.value)
    assert "--data-on host" in str(e.value) and "--image-size" in str(e.value)
    monkeypatch.setattr(utils, "host_memory_available", lambda: 6 * GB)     # nor the host's
    where, why = utils.choose_placement(split, "cuda", "auto", mapped=True)
    assert where == "host" and "memory-mapped cache (over 50% of the host's 6.0 GB" in why
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GB, 80 * GB))
    where, why = utils.choose_placement(split, "cuda", "auto")
    assert where == "device" and "copied to cuda once" in why
    assert utils.choose_placement(split, "cuda", "host")[0] == "host"
    monkeypatch.setattr(utils, "host_memory_available", lambda: 10 * GB)   # CPU: mapped stays
    assert utils.choose_placement(split, "cpu", "auto", mapped=True)[0] == "host"
    assert utils.choose_placement(split[:1000], "cpu", "auto", mapped=True)[0] == "device"


def test_other_ranks_wait_for_the_cache_build_with_a_timeout_that_allows_for_it(monkeypatch):
    import torch.distributed as dist
    from training import distributed
    calls = []
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "g")
    monkeypatch.setattr(dist, "barrier", lambda group=None: calls.append(("barrier", group)))
    monkeypatch.setattr(distributed, "_DATA_GROUP", [])
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "DIST", distributed.Distributed(rank, 2, rank))
        with distributed.main_first():
            calls.append(("block", rank))
    assert calls == [("new_group", {"backend": "gloo", "timeout": distributed.DATA_TIMEOUT}),
                     ("barrier", "g"), ("block", 1), ("block", 0), ("barrier", "g")]
    assert distributed.DATA_TIMEOUT.total_seconds() >= 6 * 3600


def test_a_folder_run_resumes_exactly_with_its_split(tmp_path, cli):
    root = image_folder(tmp_path / "pets", per_class=20)
    straight = tiny(root, tmp_path / "cache", tmp_path / "straight", "--iw-samples", 0)
    cli("standard_vae.py", *straight)
    cli("standard_vae.py", *tiny(root, tmp_path / "cache", tmp_path / "cut", "--iw-samples", 0,
                                 "--max-steps", 4))
    cli("standard_vae.py", *tiny(root, tmp_path / "cache", tmp_path / "cut", "--iw-samples", 0,
                                 "--resume", "--cache-dir", tmp_path / "elsewhere"))
    logs = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["log"]
            for r in ("straight", "cut")]
    assert logs[0] == logs[1] and logs[0][-1]["step"] == 6
    with pytest.raises(AssertionError, match="--val-fraction cannot change on --resume"):
        cli("standard_vae.py", *tiny(root, tmp_path / "cache", tmp_path / "cut", "--resume",
                                     "--val-fraction", 0.2))


@pytest.mark.slow              # torchrun: two processes, one builds the cache, the other waits
def test_torchrun_on_a_folder_builds_the_cache_once_and_resumes(tmp_path):
    from conftest import ROOT, torchrun
    root = image_folder(tmp_path / "pets", per_class=40)
    args = tiny(root, tmp_path / "cache", tmp_path / "run", "--iw-samples", 0)
    proc = torchrun(ROOT / "standard_vae.py", *args)
    assert proc.stdout.count("decoding") <= 2 and proc.stdout.count("folder ") == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
    torchrun(ROOT / "standard_vae.py", *args[:-2], "--max-steps", 8, "--resume")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8


def test_the_vq_vae_and_its_prior_train_on_a_folder(tmp_path, cli):
    root = image_folder(tmp_path / "pets", per_class=20, grey=True)
    proc = cli("vq_vae.py", *tiny(root, tmp_path / "cache", tmp_path / "vq", "--hidden", 16,
                                  "--res-hidden", 8, "--res-layers", 1, "--codes", 16,
                                  "--latent", 8, "--prior-max-steps", 2, "--prior-batch-size",
                                  8, "--prior-channels", 8, "--prior-layers", 2))
    assert "1 channel (every image grey)" in proc.stdout
    metrics = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["prior"]["steps"] == 2
    assert (tmp_path / "vq" / "samples.png").exists()
