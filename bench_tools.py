"""What bench.py measures with, apart from the models: the machine (CPU, flags, a measured
peak), FLOPs counted from the layers, timing in interleaved rounds (wall and CPU time, minor
page faults), the profiler's top ops, the benchmark's data (a CelebA-format JPEG fixture and
the common pipeline's dataset) and the lines of its report."""
import copy
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import utils
from faces import write_faces
from training import devices
from training.files import building
from training.errors import UserError


# ----------------------------------------------------------------------------------------------
# Data: a CelebA-format fixture (official layout), written once into a folder bench.py owns,
# and dSprites images rendered in memory
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
            raise UserError(f"--data-root {root} exists and was not created by bench.py, "
                                  "which never writes into a data folder it did not create; "
                                  "give a new folder (bench.py creates it and keeps the fixture "
                                  "there), or leave --data-root out for a temporary one")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --data-root {root}: {e.strerror}") from None
    (root / OWNED).touch()
    return root


def write_jpeg_fixture(root, n, seed=0):
    """n 178x218 synthetic faces in CelebA's official layout (faces.py), all in the training
    partition; written once per fixture folder."""
    folder = Path(root) / "celeba"
    if not (folder / "list_eval_partition.txt").exists():      # written last: a whole fixture
        write_faces(root, n, seed, split=(1.0, 0.0))
    return folder


def dsprites_images(n):
    """The first n images of the dSprites training split, (n, 1, 64, 64) uint8 in {0, 255},
    rendered in memory by the project's renderer (the images the dSprites runs train on when
    the official file is absent); nothing is written."""
    return utils.render_dsprites(utils.dsprites_classes(utils.dsprites_split("train")[:n]))


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


def celeba_fixture(root, n):
    """The CelebA-format fixture of `n` JPEGs in `root` (written once) and its decoded 64 px
    images: (uint8 images, the celeba folder, the seconds spent writing and, on the first
    load, decoding and caching)."""
    t = time.perf_counter()
    with building(root, f"the bench fixture in {root}"):
        folder = write_jpeg_fixture(root, n)
    fixture_s = time.perf_counter() - t
    fresh = not (folder / "celeba_cache_crop148_64px.npy").exists()
    t = time.perf_counter()
    images = utils.load_celeba(root, "train", image_size=64).images
    decode_s = time.perf_counter() - t if fresh else None
    return images, folder, {"fixture_write_s": fixture_s, "decode_and_cache_s": decode_s,
                            "decode_per_10k_images_s": decode_s * 10_000 / n if decode_s
                            else None}


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


# ----------------------------------------------------------------------------------------------
# The machine: CPU, flags and a measured peak
# ----------------------------------------------------------------------------------------------
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# settings that change the speed of a CPU run: threads, and how freed tensor memory is kept
# (glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, PyTorch's huge pages, an allocator
# preloaded in place of glibc's)
ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def cpu_model():
    """/proc/cpuinfo's "model name" (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    """What the numbers were measured on: the CPU's model, its flags that matter for the
    arithmetic, torch's kernel level, the threads, the GPU if one is used, and the
    environment variables that change the speed (ENV, MALLOC_*)."""
    flags = devices.cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": {f: f in flags for f in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": devices.native_bf16(device)[1],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "env": {k: v for k, v in os.environ.items() if k in ENV or k.startswith("MALLOC_")}}


def best_seconds(fn, device, repeats):
    """The fastest of `repeats` timed calls of fn(), after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measured_peak(device, n, repeats=5):
    """The measured peak in fp32, bf16 and (on CUDA) fp16: the best GFLOP/s of two large
    kernels on this process's threads, each the best of `repeats` calls after a warm-up. An
    (n, n) @ (n, n) matmul, 2 n^3 FLOPs (on x86 CPUs fp32 goes to MKL's GEMM, bf16 to
    oneDNN's, as autocast runs a Linear), and a 3x3 convolution of n/8 channels to n/8 on a
    (8, n/8, 32, 32) channels-last batch, 2 x outputs x in-channels x 9 FLOPs (oneDNN on
    CPUs). Both count: the two libraries' kernels can differ by a factor of two or more on one
    CPU. A theoretical peak (cores x clock x FLOPs per cycle) is not derived: a virtual machine
    hides the clock."""
    c = max(1, n // 8)
    result = {}
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    for name, dtype in dtypes + ([("fp16", torch.float16)] if device.type == "cuda" else []):
        g = torch.Generator(device).manual_seed(0)
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
        x = torch.randn(8, c, 32, 32, device=device, dtype=dtype, generator=g)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype, generator=g)
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
        out = torch.empty(n, n, device=device, dtype=dtype)
        parts = {"matmul": 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=out), device,
                                                     repeats) / 1e9,
                 "conv": 2 * 8 * c * 32 * 32 * c * 9 / best_seconds(
                     lambda: nn.functional.conv2d(x, w, padding=1), device, repeats) / 1e9}
        result[name] = max(parts.values())
        result[name + "_parts"] = parts
    result["how"] = (f"measured: the faster of a ({n}, {n}) @ ({n}, {n}) matmul and a 3x3 "
                     f"convolution {c} -> {c} channels on (8, {c}, 32, 32) channels-last, best "
                     f"of {repeats} calls each, per dtype, on {torch.get_num_threads()} threads")
    return result


# ----------------------------------------------------------------------------------------------
# FLOPs, counted from the layers
# ----------------------------------------------------------------------------------------------
COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FLOPS_HOW = ("2 FLOPs per multiply-add of every Conv2d, ConvTranspose2d and Linear call in one "
             "training-mode forward pass (Conv2d: output elements x in_channels/groups x "
             "kernel area; ConvTranspose2d: input elements x out_channels/groups x kernel "
             "area, border outputs cropped by padding included; Linear: input rows x in x out "
             "features), divided by the batch; a training step adds the backward pass, per "
             "layer one more forward's worth for the weight gradient and one for the input "
             "gradient unless the layer's input needs none (the first layer); biases, "
             "activations, losses, the VQ quantiser's distances, the TC estimator and Adam "
             "are not counted")


def layer_macs(module, x, y):
    """Multiply-adds of one call of a counted layer on input x and output y, whole batch."""
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features                  # rows x in x out
    kernel = math.prod(module.kernel_size)
    if isinstance(module, nn.ConvTranspose2d):                   # each input scatters a kernel
        return x.numel() * module.out_channels // module.groups * kernel
    return y.numel() * module.in_channels // module.groups * kernel     # Conv2d


def count_flops(model, x):
    """{"forward", "step"}: FLOPs per image of model(x) and of a training step on x, counted
    from the layers as FLOPS_HOW says, on a copy of `model` in training mode (a forward may
    change state: the VQ-VAE's EMA codebook)."""
    model = copy.deepcopy(model).train()
    forward = step = 0

    def hook(module, inputs, output):
        nonlocal forward, step
        macs = layer_macs(module, inputs[0], output)
        forward += 2 * macs
        step += 2 * macs * (1 + module.weight.requires_grad + inputs[0].requires_grad)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED)]
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {"forward": forward / len(x), "step": step / len(x)}


# ----------------------------------------------------------------------------------------------
# Timing: interleaved rounds
# ----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """This process's minor page faults so far (Unix), or None."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(run, steps, device):
    """Wall and CPU seconds and minor page faults of run(steps)."""
    sync(device)
    faults, cpu, wall = minor_faults(), time.process_time(), time.perf_counter()
    run(steps)
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu,
            "faults": None if faults is None else minor_faults() - faults}


def time_rounds(pipelines, steps, repeats, device):
    """`repeats` rounds; in each every pipeline runs `steps` steps, in an order rotated by one
    each round (no pipeline always follows the same one). Returns each one's rounds."""
    names = list(pipelines)
    rounds = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            rounds[k].append(timed(pipelines[k], steps, device))
    return rounds


def speed(rounds, steps, batch, threads):
    """A pipeline's images/s: the median round, the best and worst, the spread (max - min) /
    median, the median share of the threads' time the process got on the CPU, and the median
    minor page faults per step."""
    ips = [steps * batch / r["wall_s"] for r in rounds]
    med = statistics.median(ips)
    faults = [r["faults"] for r in rounds]
    return {"images_per_s": med, "best": max(ips), "worst": min(ips),
            "spread": (max(ips) - min(ips)) / med, "rounds": ips,
            "cpu_share": statistics.median(r["cpu_s"] / (r["wall_s"] * threads)
                                           for r in rounds),
            "faults_per_step": None if None in faults else statistics.median(faults) / steps}


def ratio(a, b):
    """a / b of two speeds: of the medians, and the lowest and highest of the per-round
    ratios (the rounds are interleaved, so round r of each ran side by side)."""
    per_round = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    return {"ratio": a["images_per_s"] / b["images_per_s"], "rounds_min": min(per_round),
            "rounds_max": max(per_round)}

def profile_ops(run, steps, top, device="cpu"):
    """The `top` ops by self CPU time over run(steps) (after one untimed step), from
    torch.profiler: [(op, self CPU ms per step, share of the steps' self time)]. Self time
    includes what the kernel waits for, such as page faults on fresh memory. On CUDA (`device`)
    the profiler records the GPU's kernels too (the JSON keeps the CPU side only)."""
    device = torch.device(device)
    run(1)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        run(steps)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.self_cpu_time_total / total)
            for e in events[:top]]


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def pct(x):
    return f"{100 * x:.0f}%"


LEGEND = ("images/s, the median of interleaved rounds; * = the precision auto picks; noise = "
          "half the spread of the rounds; cpu = CPU time / (wall x threads), under 100%: the "
          "machine was busy; faults = minor page faults per step")
HEADER = ("model         prec   baseline     ours noise    limit noise  ours/limit (rounds)  "
          "GFLOP/s  peak   cpu  faults/step ours, limit")


def describe_row(name, prec, auto, row):
    """One line of the table: images/s (median of rounds) with noise (half the spread), the
    ratio with its range over rounds, ours' GFLOP/s and share of the peak, the CPU share and
    the page faults."""
    o, lim, rl = row["ours"], row["limit"], row["ours_over_limit"]
    base = f"{row['baseline']['images_per_s']:8.0f}" if "baseline" in row else "       -"
    faults = "/".join("-" if s["faults_per_step"] is None else f"{s['faults_per_step']:.0f}"
                      for s in (o, lim))
    return (f"{name:13s} {prec}{'*' if prec == auto else ' '} {base} "
            f"{o['images_per_s']:8.0f} {pct(o['spread'] / 2):>5s} "
            f"{lim['images_per_s']:8.0f} {pct(lim['spread'] / 2):>5s}  "
            f"{rl['ratio']:4.2f} ({rl['rounds_min']:.2f}-{rl['rounds_max']:.2f})  "
            f"{row['ours_gflops']:8.1f} {pct(row['ours_fraction_of_peak']):>5s} "
            f"{pct(o['cpu_share']):>5s}  {faults}")


def describe_machine(m, peak):
    """One line: the device, threads, torch, the CPU flags of interest and the peak."""
    flags = " ".join(f for f, on in m["cpu_flags"].items() if on) or "none of interest"
    peaks = ", ".join(f"{d} {peak[d]:.0f} (matmul {peak[d + '_parts']['matmul']:.0f}, conv "
                      f"{peak[d + '_parts']['conv']:.0f})" for d in ("fp32", "bf16"))
    return (f"{m['gpu'] or m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch "
            f"{m['torch']} ({m['torch_cpu_capability']}); flags: {flags}; peak GFLOP/s "
            f"{peaks}; {peak['how']}")


def print_details(models):
    """Below the table: FLOPs per image and auto's line for each model, then for each row
    channels-last against contiguous, the TC estimator's share and the top profiled ops."""
    print("FLOPs per image (a step is forward + backward, counted from the layers; 'how' in "
          "the JSON says how), and the precision auto picks:")
    for name, r in models.items():
        f = r["flops_per_image"]
        print(f"  {name:13s} forward {f['forward'] / 1e6:8.1f} MFLOP, step "
              f"{f['step'] / 1e6:8.1f} MFLOP; batch {r['batch']}, {r['steps_per_round']} steps "
              f"per round; {r['auto_line']}")
    for name, r in models.items():
        for prec, row in r["rows"].items():
            if "memory_formats" in row:
                c = row["memory_formats"]["channels_last_over_contiguous"]
                print(f"  channels-last on CPU, {name} {prec}: ours {c['ratio']:.2f}x "
                      f"contiguous (rounds {c['rounds_min']:.2f}-{c['rounds_max']:.2f})")
            if "tc_share_of_step" in row:
                print(f"  TC estimator, {name} {prec}: {1e3 * row['tc_estimator_s']:.1f} ms "
                      f"forward+backward, {pct(row['tc_share_of_step'])} of ours' step")
            for op, ms, share in row.get("profile_limit_top_ops", [])[:5]:
                print(f"  profile {name} {prec}: {op} {ms:.1f} ms/step ({pct(share)})")


def targets(models, native):
    """The targets against this run, one line each: ours/limit <= 1 within noise (half the
    range of the per-round ratios) in every row; auto not slower than fp32 by more than 5%;
    with native bf16, the beta-VAE pipelines (auto) at >= 1.6x their fp32."""
    lines = []
    for name, r in models.items():
        for prec, row in r["rows"].items():
            rl = row["ours_over_limit"]
            noise = (rl["rounds_max"] - rl["rounds_min"]) / 2
            lines.append(f"{name} {prec}: ours/limit {rl['ratio']:.2f} "
                         f"{'met' if rl['ratio'] <= 1 + noise else 'MISSED'} (<= 1 + the "
                         f"noise of its rounds, {noise:.2f})")
        a = r["auto_over_fp32"]
        lines.append(f"{name}: auto ({r['auto']}) / fp32 {a['ratio']:.2f} "
                     f"{'met' if a['ratio'] >= 0.95 else 'MISSED'} (>= 0.95)")
        if native and name.startswith("beta_vae"):
            lines.append(f"{name}: auto / fp32 {a['ratio']:.2f} "
                         f"{'met' if a['ratio'] >= 1.6 else 'MISSED'} (>= 1.6 with native bf16)")
    return lines
