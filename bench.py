"""Training throughput of each model, side by side, on CelebA-format JPEGs at 64x64, batch 64.

- baseline: the common pipeline: a folder of JPEGs read through PIL transforms (centre crop,
  resize, ToTensor) in a DataLoader, fp32, and loss.item() three times per step;
- ours:     the scripts' default path: the decoded uint8 cache resident on the device, batches
  sliced with a seeded permutation, losses summed on the device and read every 100 steps,
  bf16 autocast on CUDA;
- limit:    our training step on one pre-made batch already on the device (no data handling).

Also: the CPU thread count and channels-last, and how time per epoch scales with the number of
images and the image size. Prints a table and writes JSON.

    python bench.py --out bench.json
"""
import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import beta_vae as bv
import standard_vae as sv
import utils
import vq_vae as vq
from tests.faces import write_faces
from training import arguments, console, devices, files, loop


# ----------------------------------------------------------------------------------------------
# Data: a CelebA-format fixture (official layout), written once into a folder bench.py owns
# ----------------------------------------------------------------------------------------------
OWNED = ".vae_bench_fixture"          # marks a folder that bench.py created


def fixture_root(path):
    """The folder for the fixture and its cache: a new temporary one, or `path` when bench.py
    created it (it holds the OWNED mark) or it does not exist yet. A benchmark never writes into
    a data folder it did not create, so any other folder is refused."""
    if path is None:
        root = Path(tempfile.mkdtemp(prefix="vae_bench_"))
    else:
        root = Path(path)
        if root.exists() and not (root / OWNED).is_file():
            raise utils.UserError(f"--data-root {root} exists and was not created by bench.py, "
                                  "which never writes into a data folder it did not create; "
                                  "give a new folder (bench.py creates it and keeps the fixture "
                                  "there), or leave --data-root out for a temporary one")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise utils.UserError(f"cannot create --data-root {root}: {e.strerror}") from None
    (root / OWNED).touch()
    return root


def write_jpeg_fixture(root, n, seed=0):
    """n 178x218 synthetic faces in CelebA's official layout (the tests' writer), all in the
    training partition; written once per fixture folder."""
    folder = Path(root) / "celeba"
    if not (folder / "list_eval_partition.txt").exists():      # written last: a whole fixture
        write_faces(root, n, seed, split=(1.0, 0.0))
    return folder


class JpegFolder(torch.utils.data.Dataset):
    """The common pipeline: one PIL decode and transform per item, every epoch."""

    def __init__(self, folder, size=64, crop=148):
        T = torchvision.transforms
        self.paths = sorted((Path(folder) / "img_align_celeba").glob("*.jpg"))
        self.transform = T.Compose([T.CenterCrop(crop), T.Resize(size), T.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), 0


# ----------------------------------------------------------------------------------------------
# Models: each script's default configuration, on 3x64x64 images
# ----------------------------------------------------------------------------------------------
def vae_step(model, loss_fn, lr, device, amp, channels_last):
    """standard_vae.train_step (also beta_vae's) with `loss_fn(x, logits, mu, logvar, step)`."""
    opt = devices.adam(model.parameters(), lr, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def step(x, i):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return sv.train_step(model, opt, x, lambda *out: loss_fn(*out, i), amp)
    return step


def setup_standard(device, amp=True, channels_last=False, size=64):
    args = sv.check_args(sv.parse_args(["--dataset", "celeba", "--batch-size", "64"]))
    model = sv.build_model(args, 3, size).to(device)

    def loss(x, logits, mu, logvar, step):
        return sv.vae_loss(x, logits, mu, logvar, args.recon, model.log_sigma)
    return vae_step(model, loss, args.lr, device, amp, channels_last)


def setup_beta(device, amp=True, channels_last=False, size=64):
    args = bv.check_args(bv.parse_args(["--dataset", "celeba", "--objective", "B",
                                        "--c-steps", "100000"]))
    model = bv.build_model(args, 3, size).to(device)

    def loss(x, logits, mu, logvar, step):
        return bv.beta_vae_loss(x, logits, mu, logvar, step,
                                **{k: getattr(args, k) for k in bv.LOSS_FLAGS},
                                log_sigma=model.log_sigma)
    return vae_step(model, loss, args.lr, device, amp, channels_last)


def setup_vq(device, amp=True, channels_last=False, size=64):
    """vq_vae.py's default model (the reference CIFAR-10 configuration) on 64x64 images."""
    args = vq.check_args(vq.parse_args(["--dataset", "celeba"]))
    model = vq.build_model(args, 3).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = devices.adam(model.parameters(), args.lr, device)
    variance = 0.06                  # a typical pixel variance; it only scales the loss

    def step(x, i):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        terms = vq.train_step(model, opt, x, variance, args.beta, amp)
        return {"loss": terms["loss"], "recon": terms["recon_error"],
                "kl": terms["commitment"]}           # the three numbers logged
    return step


MODELS = {"standard_vae": setup_standard, "beta_vae": setup_beta, "vq_vae": setup_vq}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run_steps, steps, warmup, batch, device):
    """images/s of `run_steps(n)` over `steps` steps after `warmup` steps."""
    run_steps(warmup)
    sync(device)
    t = time.perf_counter()
    run_steps(steps)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


# ----------------------------------------------------------------------------------------------
# The three pipelines
# ----------------------------------------------------------------------------------------------
def bench_limit(name, device, batch, steps, warmup, channels_last=False):
    torch.manual_seed(0)
    step = MODELS[name](device, amp=device.type == "cuda", channels_last=channels_last)
    x = torch.rand(batch, 3, 64, 64, device=device)
    counter = iter(range(10**9))
    return timed(lambda n: [step(x, next(counter)) for _ in range(n)], steps, warmup, batch,
                 device)


def bench_ours(name, device, images, batch, steps, warmup, log_every=100):
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    step = MODELS[name](device, amp=device.type == "cuda", channels_last=cuda)    # as the scripts do on CUDA
    batches = utils.DeviceBatches(images, batch, device, seed=0, channels_last=cuda)
    running = loop.RunningMean()
    state = {"i": 0, "it": iter(())}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = batches.epoch(state["i"] // len(batches))
                x = next(state["it"])
            terms = step(x, state["i"])
            running.add({k: terms[k] for k in ("loss", "recon", "kl")})
            state["i"] += 1
            if state["i"] % log_every == 0:
                running.read(state["i"], ".")
    return timed(run, steps, warmup, batch, device)


def bench_baseline(name, device, folder, batch, steps, warmup, workers):
    torch.manual_seed(0)
    step = MODELS[name](device, amp=False)
    loader = torch.utils.data.DataLoader(JpegFolder(folder), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    state = {"i": 0, "it": iter(loader)}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = iter(loader)
                x = next(state["it"])
            terms = step(x[0].to(device), state["i"])
            # the usual logging: three host-device syncs per step
            _ = terms["loss"].item(), terms["recon"].item(), terms["kl"].item()
            state["i"] += 1
    return timed(run, steps, warmup, batch, device)


def epoch_seconds(name, device, images, batch):
    """One epoch of the ours path over `images`, timed whole."""
    torch.manual_seed(0)
    step = MODELS[name](device, amp=device.type == "cuda", size=images.shape[-1])
    batches = utils.DeviceBatches(images, batch, device, seed=0)
    sync(device)
    t = time.perf_counter()
    for i, x in enumerate(batches.epoch(0)):
        step(x, i)
    sync(device)
    return time.perf_counter() - t


def data_epoch_seconds(device, images, folder, batch, workers):
    """One epoch of data alone, no model: the decoded cache on the device vs JPEGs via PIL."""
    batches = utils.DeviceBatches(images, batch, device, seed=0)
    sync(device)
    t = time.perf_counter()
    for x in batches.epoch(0):
        pass
    sync(device)
    cache_s = time.perf_counter() - t
    loader = torch.utils.data.DataLoader(JpegFolder(folder), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    t = time.perf_counter()
    for x, _ in loader:
        x.to(device)
    sync(device)
    return {"cache": cache_s, "imagefolder_pil": time.perf_counter() - t}


def main(args):
    if args.images < args.batch_size:
        raise utils.UserError(f"--images {args.images} is fewer than one batch of "
                              f"--batch-size {args.batch_size}")
    device = devices.get_device(args.device)
    root = fixture_root(args.data_root)
    try:
        return run_benchmarks(args, device, root)
    finally:
        if args.data_root is None:             # the temporary fixture goes with the run
            shutil.rmtree(root, ignore_errors=True)


def run_benchmarks(args, device, root):
    t = time.perf_counter()
    with files.building(root, f"the bench fixture in {root}"):
        folder = write_jpeg_fixture(root, args.images)
    fixture_s = time.perf_counter() - t
    fresh = not (folder / "celeba_cache_crop148_64px.npy").exists()
    t = time.perf_counter()
    images = utils.load_celeba(root, "train", image_size=64).images
    decode_s = time.perf_counter() - t if fresh else None
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch": args.batch_size, "images": args.images, "steps": args.steps,
              "fixture_write_s": fixture_s, "decode_and_cache_s": decode_s,
              "decode_per_10k_images_s": decode_s * 10_000 / args.images if decode_s else None,
              "models": {}}
    for name in args.models:
        r = {"limit": bench_limit(name, device, args.batch_size, args.steps, args.warmup),
             "ours": bench_ours(name, device, images, args.batch_size, args.steps, args.warmup),
             "baseline": bench_baseline(name, device, folder, args.batch_size, args.steps,
                                        args.warmup, args.workers)}
        r["ours_over_limit"] = r["ours"] / r["limit"]
        r["ours_over_baseline"] = r["ours"] / r["baseline"]
        r["celeba_30_epochs_projected_min"] = 30 * 162_770 / r["ours"] / 60
        result["models"][name] = r
        print(f"{name:14s} baseline {r['baseline']:9.0f}  ours {r['ours']:9.0f}  "
              f"limit {r['limit']:9.0f} images/s   ours/limit {r['ours_over_limit']:.2f}  "
              f"ours/baseline {r['ours_over_baseline']:.1f}x", flush=True)
    if args.extras:
        name = args.models[0]
        threads = torch.get_num_threads()
        extras = {}
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            extras[f"limit_threads_{n}"] = bench_limit(name, device, args.batch_size,
                                                       args.steps, args.warmup)
        torch.set_num_threads(threads)
        extras["limit_channels_last"] = bench_limit(name, device, args.batch_size, args.steps,
                                                    args.warmup, channels_last=True)
        sizes = [args.images // 4, args.images // 2, args.images]
        extras["epoch_s_by_images_64px"] = {n: epoch_seconds(name, device, images[:n],
                                                             args.batch_size) for n in sizes}
        small = utils.load_celeba(root, "train", image_size=32).images
        extras["epoch_s_32px"] = {args.images: epoch_seconds(name, device, small,
                                                             args.batch_size)}
        extras["data_only_epoch_s"] = data_epoch_seconds(device, images, folder, args.batch_size,
                                                         args.workers)
        result["extras_" + name] = extras
        print(json.dumps(extras, indent=1))
    if args.out:
        files.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


def model_list(text):
    """--models: a comma list of known model names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(MODELS)}")
    return names


def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--models", type=model_list, default=list(MODELS),
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--batch-size", type=arguments.positive_int, default=64)
    p.add_argument("--images", type=arguments.positive_int, default=2048,
                   help="JPEGs in the fixture")
    p.add_argument("--steps", type=arguments.positive_int, default=40,
                   help="timed steps per measurement")
    p.add_argument("--warmup", type=arguments.nonneg_int, default=5, help="untimed steps first")
    p.add_argument("--workers", type=arguments.nonneg_int, default=2,
                   help="DataLoader workers of the baseline")
    p.add_argument("--data-root", default=None,
                   help="a new folder that bench.py creates to keep the JPEG fixture and cache "
                        "for later runs; never an existing data folder (default: a temporary "
                        "folder, removed at the end)")
    p.add_argument("--extras", action="store_true",
                   help="also threads, channels-last and epoch-time scaling (first model)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    console.run_command(main, parse_args)
