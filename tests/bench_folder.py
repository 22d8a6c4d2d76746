"""Benchmark (not a test) of a folder's data path, back to back in one process:

1. decode rate: CelebA-sized JPEGs (178x218, tests/faces.py) decoded to 64 px on every core,
   by the folder decoder (image_folders.decode_folder_chunk: centre square, DCT-scaled decode)
   and by CelebA's (utils._decode_celeba: 148 px centre crop), on the same files, in
   interleaved rounds;
2. training images/s of standard_vae.py's step at 64 px with its batches from the device
   (DeviceBatches) and from host memory (HostBatches: the memory-mapped cache, a gather thread),
   the same steps in interleaved rounds. On the CPU both live in host memory: this measures the
   cost of HostBatches' machinery, the target being at least 0.9x.

    python tests/bench_folder.py --images 2000 --out runs/bench_folder.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faces                                                       # noqa: E402
import image_folders                                               # noqa: E402
import standard_vae as sv                                          # noqa: E402
import utils                                                       # noqa: E402


def write_jpegs(folder, n, seed=0):
    """n synthetic 178x218 faces as JPEGs (quality 95), as CelebA stores its images."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        img = faces.draw_face(rng, bool(rng.random() < 0.5), bool(rng.random() < 0.3),
                              bool(rng.random() < 0.5))
        names.append(f"{i:06d}.jpg")
        Image.fromarray(np.asarray(img)).save(folder / names[-1], quality=95)
    return names


def decode_rates(folder, names, workers, rounds):
    """{decoder: [images/s per round]}, the two decoders alternating."""
    paths = [str(folder / f) for f in names]
    decoders = {"folder": (image_folders.decode_folder_chunk, (64, 3)),
                "celeba": (utils._decode_celeba, (148, 64))}
    rates = {k: [] for k in decoders}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (decode, options) in decoders.items():
                cache = Path(tmp) / f"{name}{r}.npy"
                t = time.perf_counter()
                image_folders.build_image_cache(paths, decode, options, (len(paths), 3, 64, 64),
                                                cache, {}, f"decoding ({name})", chunk=250,
                                                workers=workers)
                rates[name].append(len(paths) / (time.perf_counter() - t))
                cache.unlink()
    return rates


def training_rates(images, steps, rounds, batch=64):
    """{path: [training images/s per round]}: standard_vae's step on DeviceBatches and on
    HostBatches of the same memory-mapped split, alternating; each round trains `steps`
    steps of a fresh copy of the same model from the same batches."""
    device = torch.device("cpu")
    args = sv.check_args(sv.parse_args(["--dataset", "folder", "--image-size", "64"]))
    base = sv.build_model(args, images.shape[1], 64)
    loss = lambda x, logits, mu, logvar: sv.vae_loss(x, logits, mu, logvar, "bce")
    kinds = {"device": utils.DeviceBatches, "host": utils.HostBatches}
    rates = {k: [] for k in kinds}
    for r in range(rounds + 1):                      # round 0 warms up and is not counted
        for name, kind in kinds.items():
            torch.manual_seed(0)
            model = sv.build_model(args, images.shape[1], 64)
            model.load_state_dict(base.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            batches = kind(images, batch, device, seed=r)
            t = time.perf_counter()
            for i, x in enumerate(batches.epoch(0)):
                sv.train_step(model, opt, x, loss)
                if i + 1 == steps:
                    break
            if r > 0:
                rates[name].append(steps * batch / (time.perf_counter() - t))
    return rates


def summary(rates):
    return {k: {"median": statistics.median(v), "rounds": [round(x, 1) for x in v]}
            for k, v in rates.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="JPEGs decoded per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="training steps per round")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--out", default="runs/bench_folder.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "faces"
        names = write_jpegs(folder, args.images)
        decode = summary(decode_rates(folder, names, args.workers, args.rounds))
        cache = Path(tmp) / "cache.npy"
        image_folders.build_image_cache([str(folder / f) for f in names],
                                image_folders.decode_folder_chunk, (64, 3),
                                (len(names), 3, 64, 64), cache, {}, "decoding", chunk=250,
                                workers=args.workers)
        images = torch.from_numpy(np.load(cache, mmap_mode="c"))
        train = summary(training_rates(images, args.steps, args.rounds))
        del images
    result = {
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "unknown"),
        "cores": os.cpu_count(), "workers": args.workers, "torch_threads": 1,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "decode_images_per_s": decode,
        "decode_folder_over_celeba": decode["folder"]["median"] / decode["celeba"]["median"],
        "train_images_per_s": train,
        "host_over_device": train["host"]["median"] / train["device"]["median"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
