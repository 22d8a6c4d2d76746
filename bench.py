"""Training throughput of each model, side by side: the common pipeline, ours, and our limit.

- baseline: the common pipeline: a folder of JPEGs read through PIL transforms (centre crop,
  resize, ToTensor) in a DataLoader, fp32, and loss.item() three times per step (the CelebA
  models only);
- ours:     the scripts' path: the decoded uint8 images resident on the device, batches sliced
  with a seeded permutation, the loss terms summed on the device and read every 100 steps, in
  the scripts' memory format (channels-last on FAST_PATHS devices), in fp32 and in the
  precision --precision auto picks, if not fp32 (bf16, or fp16 with loss scaling);
- limit:    our exact step (the same model, loss, train_step, precision and memory format as
  ours) on one real batch of the same images, already in memory: ours without the data
  handling and the logging, so ours/limit should not exceed 1 beyond noise.

Every pipeline of a model is timed in --repeats interleaved rounds (each runs every pipeline
for the same steps, in a rotating order), so that a drift of the machine hits them all alike: a
speed is the median round, its noise the spread of the rounds. Each round also records the CPU
time (below 1 per thread: the machine was busy) and the minor page faults per step, which
depend on the process's history of allocations, shared by interleaved pipelines. `--precision
auto` is resolved by devices.choose_precision, the scripts' rule on the hardware (its line is
kept); this is where a measured slowdown of that precision would show. FLOPs per image,
counted from the layers, are set against a measured peak in fp32, bf16 and, on CUDA, fp16
(bench_tools.py). On a CPU,
ours is also timed channels-last (the scripts use it on CUDA only); the beta-TCVAE MLP's step
is split into the TC estimator's share and the rest; the limit of each row is profiled.

    python bench.py --extras --out runs/bench.json
"""
import argparse
import copy
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

import beta_vae as bv
import bench_tools as bt
import standard_vae as sv
import utils
import vq_vae as vq
from training import arguments, console, devices, files, loop
from training.errors import UserError


# ----------------------------------------------------------------------------------------------
# Models: each script's configuration, with its own train_step and loss
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """A model as its script trains it: `step(model, opt, x, i, precision, scaler)` is the
    script's own train_step and loss at step i (for `model` or a copy of it); `logged`, the
    terms its loop sums for the log; `tc`, for objective TC, (training images, estimator)."""
    model: nn.Module
    lr: float
    step: object
    logged: tuple
    tc: tuple = None


def setup_standard(images, device):
    """standard_vae.py's defaults: conv widths 32-32-64-64, FC 256, latent 10, Bernoulli."""
    args = sv.check_args(sv.parse_args(["--dataset", "celeba"]))
    model = sv.build_model(args, images.shape[1], images.shape[-1]).to(device)
    loss = sv.training_loss(args.recon, args.kl_warmup, args.free_bits)

    def step(model, opt, x, i, precision, scaler):
        return sv.train_step(model, opt, x, partial(loss, log_sigma=model.log_sigma, step=i),
                             precision, scaler)
    return Setup(model, args.lr, step, sv.LOGGED)


def beta_setup(argv, images, device, data_size):
    """beta_vae.py with the flags `argv`; `data_size`: training images (objective TC)."""
    args = bv.check_args(bv.parse_args(argv))
    model = bv.build_model(args, images.shape[1], images.shape[-1]).to(device)
    objective = bv.objective_settings(args, data_size)

    def step(model, opt, x, i, precision, scaler):
        return bv.train_step(model, opt, x, i, objective, model.log_sigma, precision, scaler)
    tc = (data_size, args.tc_estimator) if args.objective == "TC" else None
    return Setup(model, args.lr, step, bv.LOGGED, tc)


def setup_beta(images, device):
    """beta_vae.py's conv network (Burgess et al.: four 32-channel convs, FC 256), objective B
    with the published 100,000-step capacity schedule."""
    return beta_setup(["--dataset", "celeba", "--objective", "B", "--c-steps", "100000"],
                      images, device, len(images))


def setup_beta_mlp(images, device):
    """The beta-VAE paper's dSprites MLP (4096-1200-1200-20, 10-1200-1200-1200-4096), objective
    TC, mss, beta 6, lr 1e-3: the recipe of our disentanglement runs (batch --mlp-batch-size),
    weighed against the 663,552 training images; beta full from step 0 (the same work)."""
    return beta_setup(["--dataset", "dsprites", "--arch", "mlp", "--objective", "TC",
                       "--tc-estimator", "mss", "--beta", "6", "--lr", "1e-3",
                       "--beta-warmup", "0", "--mig-points", "0"],
                      images, device, len(utils.dsprites_split("train")))


def setup_vq(images, device):
    """vq_vae.py's default model, dividing by the pixel variance of the images it trains on."""
    args = vq.check_args(vq.parse_args(["--dataset", "celeba"]))
    model = vq.build_model(args, images.shape[1]).to(device)
    variance = vq.data_variance(images, device)

    def step(model, opt, x, i, precision, scaler):
        return vq.train_step(model, opt, x, variance, args.beta, precision, scaler)
    return Setup(model, args.lr, step, vq.TRAIN_TERMS)


@dataclass
class ModelSpec:
    setup: object              # (uint8 images, device) -> Setup
    data: str                  # "celeba": the JPEG fixture; "dsprites": rendered in memory
    fit_channels_last: bool    # the script makes model and batches channels-last on FAST_PATHS
    conv: bool                 # has convolutions: channels-last is worth timing


MODELS = {"standard_vae": ModelSpec(setup_standard, "celeba", True, True),
          "beta_vae": ModelSpec(setup_beta, "celeba", True, True),
          "vq_vae": ModelSpec(setup_vq, "celeba", False, True),
          "beta_vae_mlp": ModelSpec(setup_beta_mlp, "dsprites", True, False)}


# ----------------------------------------------------------------------------------------------
# The pipelines: each a function run(n) that takes n training steps
# ----------------------------------------------------------------------------------------------
def in_format(model, channels_last):
    """A copy of `model` in the memory format (all copies start from the same weights)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last if channels_last
                                   else torch.contiguous_format)


def ours_pipeline(setup, model, batches, device, precision, log_every=100):
    """The body of loop.train with the script's step: the next device batch of the epoch's
    permutation, the step, the terms summed on the device, read every `log_every` steps."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    scaler = devices.grad_scaler(device, precision)
    running = loop.RunningMean()
    state = {"i": 0, "it": iter(())}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = batches.epoch(state["i"] // len(batches))
                x = next(state["it"])
            terms = setup.step(model, opt, x, state["i"], precision, scaler)
            running.add({k: terms[k] for k in setup.logged if k in terms})
            state["i"] += 1
            if state["i"] % log_every == 0:
                running.read(state["i"], ".")
    return run


def limit_pipeline(setup, model, x, device, precision):
    """The script's step alone, on the one batch x, over and over."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    scaler = devices.grad_scaler(device, precision)
    state = {"i": 0}

    def run(n):
        for _ in range(n):
            setup.step(model, opt, x, state["i"], precision, scaler)
            state["i"] += 1
    return run


def baseline_pipeline(setup, model, folder, batch, device, workers):
    """The common pipeline: JPEGs through PIL in a shuffling DataLoader, fp32, and three
    host-device syncs per step for the log."""
    opt = devices.adam(model.parameters(), setup.lr, device)
    loader = torch.utils.data.DataLoader(bt.JpegFolder(folder), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    state = {"i": 0, "it": iter(loader)}

    def run(n):
        for _ in range(n):
            x = next(state["it"], None)
            if x is None:
                state["it"] = iter(loader)
                x = next(state["it"])
            terms = setup.step(model, opt, x[0].to(device), state["i"], "fp32",
                               devices.NO_SCALER)
            _ = [terms[k].item() for k in setup.logged[:3]]
            state["i"] += 1
    return run


def tc_pipeline(model, x, data_size, estimator):
    """beta_vae.tc_decomposition forward and backward on the (z, mu, logvar) of batch x, as
    objective TC computes it inside each step (fp32, outside autocast)."""
    with torch.no_grad():
        mu, logvar = model.encoder(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    leaves = [t.detach().requires_grad_() for t in (z, mu, logvar)]

    def run(n):
        for _ in range(n):
            terms = bv.tc_decomposition(*leaves, data_size, estimator)
            (terms["mi"] + terms["tc"] + terms["dim_kl"]).backward()
            for t in leaves:
                t.grad = None
    return run


def key(kind, precision, other_format=False):
    """"ours fp32", "limit bf16", "ours bf16 other format" (not the script's on this device)."""
    return f"{kind} {precision}{' other format' if other_format else ''}"


def bench_model(spec, images, batch, device, steps, round_seconds, repeats, warmup):
    """Every pipeline but the baseline for one model, timed in interleaved rounds: ours and the
    limit in fp32 and in the precision auto picks (if not fp32); on a CPU, ours of a conv
    model also in the memory format the script does not use there; objective TC's estimator
    alone. `steps` per round (None: as many as take `round_seconds` at the fp32 limit's speed,
    at least 2). Returns the results and the parts (setup, model, the batch x0) for more."""
    torch.manual_seed(0)
    setup = spec.setup(images, device)
    fit_cl = spec.fit_channels_last and devices.fast_paths(device)
    model = in_format(setup.model, fit_cl)
    formats = [fit_cl] + ([not fit_cl] if device.type == "cpu" and spec.conv else [])
    batches = {cl: utils.DeviceBatches(images, batch, device, seed=0, channels_last=cl)
               for cl in formats}
    x0 = batches[fit_cl].to_float(batches[fit_cl].images[:batch])     # the limit's batch
    auto, line = devices.choose_precision("auto", device)
    precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    pipelines = {}
    for precision in precisions:
        for cl in formats:          # the script's format first: "ours fp32" is the script
            pipelines[key("ours", precision, cl != fit_cl)] = ours_pipeline(
                setup, in_format(model, cl), batches[cl], device, precision)
        pipelines[key("limit", precision)] = limit_pipeline(setup, in_format(model, fit_cl),
                                                            x0, device, precision)
    if setup.tc is not None:
        pipelines["tc estimator"] = tc_pipeline(model, x0, *setup.tc)
    for run in pipelines.values():
        run(warmup)
    if steps is None:
        once = bt.timed(pipelines[key("limit", "fp32")], 1, device)["wall_s"]
        steps = max(2, math.ceil(round_seconds / once))
    threads = torch.get_num_threads()
    rounds = bt.time_rounds(pipelines, steps, repeats, device)
    speeds = {k: bt.speed(r, steps, batch, threads) for k, r in rounds.items()}
    flops = bt.count_flops(model, x0)
    result = {"batch": batch, "steps_per_round": steps, "repeats": repeats,
              "memory_format": "channels-last" if fit_cl else "contiguous",
              "auto": auto, "auto_line": line,
              "flops_per_image": {**flops, "how": bt.FLOPS_HOW}, "rows": {}}
    for precision in precisions:
        ours, limit = speeds[key("ours", precision)], speeds[key("limit", precision)]
        row = {"ours": ours, "limit": limit, "ours_over_limit": bt.ratio(ours, limit),
               "ours_gflops": flops["step"] * ours["images_per_s"] / 1e9,
               "limit_gflops": flops["step"] * limit["images_per_s"] / 1e9}
        if len(formats) > 1:
            other = speeds[key("ours", precision, True)]
            cl, contiguous = (ours, other) if fit_cl else (other, ours)
            row["memory_formats"] = {"ours_contiguous": contiguous, "ours_channels_last": cl,
                                     "channels_last_over_contiguous": bt.ratio(cl, contiguous)}
        if setup.tc is not None:
            per_call = statistics.median(r["wall_s"] for r in rounds["tc estimator"]) / steps
            row["tc_estimator_s"] = per_call
            row["tc_share_of_step"] = per_call * ours["images_per_s"] / batch
        result["rows"][precision] = row
    rows = result["rows"]
    result["auto_over_fp32"] = bt.ratio(rows[result["auto"]]["ours"], rows["fp32"]["ours"])
    if "bf16" in rows:
        result["bf16_over_fp32"] = bt.ratio(rows["bf16"]["ours"], rows["fp32"]["ours"])
    return result, argparse.Namespace(setup=setup, model=model, x0=x0)


def bench_baseline(setup, model, folder, batch, device, workers, steps, repeats, warmup):
    """The baseline pipeline, in fp32, in rounds of its own (its DataLoader workers would take
    the CPU from the others' rounds), on a copy of `model`."""
    torch.manual_seed(0)
    run = baseline_pipeline(setup, copy.deepcopy(model).to(memory_format=torch.contiguous_format),
                            folder, batch, device, workers)
    run(warmup)
    rounds = bt.time_rounds({"baseline": run}, steps, repeats, device)["baseline"]
    return bt.speed(rounds, steps, batch, torch.get_num_threads())


# ----------------------------------------------------------------------------------------------
# Extras: threads, epoch-time scaling, data alone
# ----------------------------------------------------------------------------------------------
def epoch_seconds(spec, images, batch, device, precision):
    """One epoch of the ours path over `images`, timed whole."""
    torch.manual_seed(0)
    setup = spec.setup(images, device)
    cl = spec.fit_channels_last and devices.fast_paths(device)
    run = ours_pipeline(setup, in_format(setup.model, cl),
                        utils.DeviceBatches(images, batch, device, seed=0, channels_last=cl),
                        device, precision)
    return bt.timed(run, len(images) // batch, device)["wall_s"]


def extras(args, models, parts, images, root, folder, device):
    """For the first CelebA model of --models: the fp32 limit on 1 thread and on all; one epoch
    of ours over a quarter, half and all of the images at 64 px and all at 32 px, in auto's
    precision; one epoch of data alone. Printed and returned (None without a CelebA model)."""
    name = next((n for n in args.models if MODELS[n].data == "celeba"), None)
    if name is None:
        print("extras: none (they use the CelebA fixture; --models has no CelebA model)")
        return None
    spec, r, batch, repeats = MODELS[name], models[name], args.batch_size, args.repeats
    setup, model, x0 = parts[name].setup, parts[name].model, parts[name].x0
    threads = torch.get_num_threads()
    out = {"model": name}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        run = limit_pipeline(setup, copy.deepcopy(model), x0, device, "fp32")
        run(2)
        rounds = bt.time_rounds({"limit": run}, r["steps_per_round"], repeats, device)["limit"]
        out[f"limit_fp32_threads_{n}"] = bt.speed(rounds, r["steps_per_round"], batch, n)
    torch.set_num_threads(threads)
    sizes = sorted({max(batch, len(images) // 4), max(batch, len(images) // 2), len(images)})
    out["precision"] = r["auto"]
    out["epoch_s_by_images_64px"] = {n: epoch_seconds(spec, images[:n], batch, device,
                                                            r["auto"])
                                     for n in sizes}
    small = utils.load_celeba(root, "train", image_size=32).images
    out["epoch_s_32px"] = {len(small): epoch_seconds(spec, small, batch, device, r["auto"])}
    out["data_only_epoch_s"] = bt.data_epoch_seconds(device, images, folder, batch, args.workers)
    print(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def main(args):
    device = devices.get_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = bt.fixture_root(args.data_root)    # first: refuses a data folder it did not create
    try:
        needs = {MODELS[n].data for n in args.models}
        for data, batch, flag in (("celeba", args.batch_size, "--batch-size"),
                                  ("dsprites", args.mlp_batch_size, "--mlp-batch-size")):
            if data in needs and args.images < batch:
                raise UserError(f"--images {args.images} is fewer than one batch of {flag} {batch}")
        return run_benchmarks(args, device, root)
    finally:
        if args.data_root is None:             # the temporary fixture goes with the run
            shutil.rmtree(root, ignore_errors=True)


def run_benchmarks(args, device, root):
    torch.backends.cudnn.benchmark = device.type == "cuda"       # as the scripts set it
    result = {"machine": bt.machine_info(device), "models": {}}
    names = args.models
    images, folder = {}, None
    if any(MODELS[n].data == "celeba" for n in names):
        images["celeba"], folder, timings = bt.celeba_fixture(root, args.images)
        result.update(timings)
    if any(MODELS[n].data == "dsprites" for n in names):
        images["dsprites"] = bt.dsprites_images(args.images)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    result["peak_gflops"] = peak = bt.measured_peak(device, peak_size)
    print(bt.describe_machine(result["machine"], peak), flush=True)
    result.update(batch=args.batch_size, mlp_batch=args.mlp_batch_size, images=args.images,
                  repeats=args.repeats, warmup=args.warmup)
    print(bt.LEGEND, bt.HEADER, sep="\n")
    parts = {}
    for name in names:
        spec = MODELS[name]
        batch = args.mlp_batch_size if spec.data == "dsprites" else args.batch_size
        r, parts[name] = bench_model(spec, images[spec.data], batch, device, args.steps,
                                     args.round_seconds, args.repeats, args.warmup)
        fp32 = r["rows"]["fp32"]
        if spec.data == "celeba":
            fp32["baseline"] = bench_baseline(parts[name].setup, parts[name].model, folder,
                                              batch, device, args.workers, r["steps_per_round"],
                                              args.repeats, args.warmup)
            fp32["ours_over_baseline"] = (fp32["ours"]["images_per_s"]
                                          / fp32["baseline"]["images_per_s"])
        for prec, row in r["rows"].items():
            if args.profile_ops:
                row["profile_limit_top_ops"] = bt.profile_ops(limit_pipeline(
                    parts[name].setup, copy.deepcopy(parts[name].model), parts[name].x0,
                    device, prec), r["steps_per_round"], args.profile_ops, device)
            row["ours_fraction_of_peak"] = row["ours_gflops"] / peak[prec]
            print(bt.describe_row(name, prec, r["auto"], row), flush=True)
        result["models"][name] = r
    bt.print_details(result["models"])
    result["targets"] = bt.targets(result["models"], devices.native_bf16(device)[0])
    for line in result["targets"]:
        print("  target: " + line)
    if args.extras:
        result["extras"] = extras(args, result["models"], parts, images.get("celeba"), root,
                                  folder, device)
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
    p.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="CPU threads (default: PyTorch's, one per core or OMP_NUM_THREADS)")
    p.add_argument("--batch-size", type=arguments.positive_int, default=64,
                   help="batch of the CelebA models")
    p.add_argument("--mlp-batch-size", type=arguments.positive_int, default=512,
                   help="batch of beta_vae_mlp (the recipe of our dSprites runs)")
    p.add_argument("--images", type=arguments.positive_int, default=2048,
                   help="JPEGs in the fixture, and dSprites images rendered")
    p.add_argument("--repeats", type=arguments.positive_int, default=7,
                   help="timed rounds of every pipeline, interleaved")
    p.add_argument("--steps", type=arguments.positive_int, default=None,
                   help="timed steps per pipeline per round (default: as many as take "
                        "--round-seconds at the model's fp32 limit, at least 2)")
    p.add_argument("--round-seconds", type=arguments.positive_float, default=1.0,
                   help="sizes the rounds when --steps is not given")
    p.add_argument("--warmup", type=arguments.nonneg_int, default=3,
                   help="untimed steps of every pipeline first")
    p.add_argument("--workers", type=arguments.nonneg_int, default=2,
                   help="DataLoader workers of the baseline")
    p.add_argument("--peak-size", type=arguments.positive_int, default=None,
                   help="n of the n x n matmuls (and n/8 of the convolutions' channels) "
                        "that measure the peak (default: 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--profile-ops", type=arguments.nonneg_int, default=10,
                   help="for each model and precision, keep the ops with the most self CPU "
                        "time in one round of limit steps under torch.profiler (0 = skip)")
    p.add_argument("--data-root", default=None,
                   help="a new folder that bench.py creates to keep the JPEG fixture for later "
                        "runs; never an existing data folder (default: a temporary one)")
    p.add_argument("--extras", action="store_true",
                   help="also threads, epoch-time scaling and data alone (first CelebA model)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    console.run_command(main, parse_args)
