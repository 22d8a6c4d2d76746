"""The training loop, one for every phase (the VAEs, the VQ-VAE, the PixelCNN prior): what a
run does before its model exists (`start_run`), and `train`, the plumbing around the step that
each script writes: resume, evaluation cadence, checkpoints, signals, DDP and logging."""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import (checkpoints, console, devices, distributed, files, progress, sizes,
                      tensorboard)
from training.errors import UserError


@dataclass
class Run:
    """A run as `start_run` leaves it: the device, the run folder, the checked checkpoint that
    --resume names (None for a fresh run), the two splits, as the script's loader returns them
    (utils.ImageSet), and the precision of the networks ("fp32", "bf16" or "fp16") with the
    line that says why."""
    device: torch.device
    out: Path
    state: dict | None
    train: object
    test: object
    precision: str = "fp32"
    why: str = "precision: fp32"


def start_run(args, kind, flags, load, keys=checkpoints.RESUME_KEYS):
    """What every training run does before its model exists: join torchrun (if launched by
    it), prepare the run folder (rank 0), load and check the checkpoint that --resume names
    and take its settings into `args` in place (typed `flags` replace them), check that
    --tensorboard finds its package, set the algorithms (cuDNN's autotuner, or
    --deterministic), resolve --precision (written into `args.precision`, so that the
    checkpoint keeps it and --resume goes on in it; rank 0 says why), seed (the same initial
    weights on every rank), then load the training split and the held-out split sized to the
    run (rank 0 first: it builds any data cache alone) with the script's `load(args, split,
    limit)` (utils.load_split). The held-out size, when not given, is written into
    `args.eval_limit`, so that the checkpoint keeps it."""
    device = distributed.setup(devices.get_device(args.device))
    main = distributed.DIST.main
    out = files.prepare_out(args.out, not args.resume, args.overwrite) if main else Path(args.out)
    state = None
    if args.resume:
        state = checkpoints.resume_state(args.resume, out, kind, keys)
        vars(args).update(vars(checkpoints.resume_args(args, state, flags)))
    if args.tensorboard:
        tensorboard.require()         # a missing package stops the run now, in one line
    devices.set_algorithms(device, args.deterministic)       # before any work on the GPU
    precision, why = devices.choose_precision(
        args.precision, device, resumed=bool(args.resume) and "precision" not in args.given)
    args.precision = precision
    if main:
        print(why)
    devices.seed_everything(args.seed)
    with distributed.main_first():
        train = load(args, "train", args.limit)
        given = args.eval_limit
        args.eval_limit = sizes.held_out_size(given, *sizes.run_images(
            args.batch_size, args.epochs, args.max_steps, len(train), distributed.DIST.world))
        test = load(args, "test", args.eval_limit)
        if main and given is None:
            print(f"held-out evaluation: {len(test):,} images at every epoch end and after "
                  "training (sized to the run; --eval-limit sets it)")
    return Run(device, out, state, train, test, precision, why)


@dataclass
class Settings:
    """How `train` runs one phase, fixed before it starts. `Settings.from_args` makes those of
    a script's main phase from its flags; the display fields have defaults."""
    kind: str                        # what the checkpoint holds: "standard_vae", "vq_vae_prior"
    out: Path                        # the run folder
    steps: int                       # train up to this global step
    steps_per_epoch: int
    batch: int                       # items per step, over all ranks
    lr: float                        # Adam's rate from here on: on --resume, typed or saved
    args: dict                       # the flags, saved in every checkpoint
    log_every: int = 100             # steps between reads of the running terms (the one sync)
    eval_every: int | None = None    # steps between evaluations, besides every epoch end
    compile: bool = False            # torch.compile the model
    set_aside: str | bool | None = None   # --resume's value: checkpoints.set_aside_current
    checkpoint: str = "checkpoint.pt"     # the checkpoint's name in the run folder
    history: str = "history.json"         # the evaluations' record in the run folder
    saved: dict = field(default_factory=dict)   # more entries of every checkpoint
    reserve: tuple = ()              # more modules whose checkpoint the disk must hold
    logged: tuple | None = None      # the terms of the step to log, those it returns (None: all)
    tensorboard: Path | None = None  # the folder of TensorBoard's event files (None: off)
    shown: dict = field(default_factory=dict)   # display: logged terms on the bar, with formats
    desc: str | None = None          # display: the phase's name (default: `kind`)
    items: str = "images"            # display: what a batch holds

    @classmethod
    def from_args(cls, args, kind, run, steps_per_epoch, **more):
        """The main phase of a script: its length from --epochs and --max-steps, the rest from
        the flags, and the data's shape in every checkpoint (analysis rebuilds the model from
        it); `more` sets or replaces fields."""
        steps = sizes.run_steps(steps_per_epoch, args.epochs, args.max_steps)
        fields = dict(log_every=args.log_every, eval_every=args.eval_every, compile=args.compile,
                      set_aside=args.resume or None,
                      tensorboard=run.out if args.tensorboard else None, saved={"data": {
                          "channels": run.train.channels, "image_size": run.train.image_size}})
        return cls(kind, run.out, steps, steps_per_epoch, args.batch_size * distributed.DIST.world,
                   args.lr, vars(args), **{**fields, **more})


@dataclass
class Trained:
    """What `train` returns: the step reached, the log of running terms, the evaluations, the
    seconds spent training (evaluations left out) and this session's throughput."""
    step: int
    epochs: float
    log: list
    history: list
    train_time: float
    images_per_s: float


def summary(trained, run):
    """What a run's metrics.json says about its training: steps, data, device, time,
    throughput and the precision with the line that chose it."""
    return {"steps": trained.step, "epochs": trained.epochs, "train_images": len(run.train),
            "device": str(run.device), "world_size": distributed.DIST.world,
            "train_time_s": trained.train_time, "images_per_s": trained.images_per_s,
            "precision": precision_record(run.precision, run.why), "torch": torch.__version__}


def precision_record(precision, why):
    """The precision as metrics.json records it: its name, whether it is bf16, and why."""
    return {"name": precision, "bf16": precision == "bf16", "why": why.split(": ", 1)[1]}


def train(model, opt, step_fn, batches, settings, state=None, evaluate=None, describe=None,
          scaler=None, pictures=None, schedule=None):
    """Train `model` with `opt` up to step `settings.steps`. Each script writes its step; this
    is the plumbing around it:

    - `step_fn(fwd, batch, step)` takes one optimiser step and returns the named loss terms
      (device tensors). `fwd` is the model, wrapped in DistributedDataParallel under torchrun
      and compiled with `settings.compile`. `batches(epoch, start)` yields the batches of an
      epoch from batch `start` (DeviceBatches.epoch, say).
    - Resume: `state`, a checked checkpoint, restores the model, the optimiser, the gradient
      `scaler` of fp16 (devices.grad_scaler), the step, log, history and every rank's RNG, so
      the run continues exactly (`resume`).
    - Logging: the terms are summed on the device and read every `log_every` steps (the one
      host-device sync), which also stops the run on a non-finite term.
    - Evaluation: at every epoch end, every `eval_every` steps (if given) and at the last step,
      `evaluate(last_log)` returns the held-out scores; they join the history (written to the
      run folder), and `describe(entry)`, if given, is the line printed.
    - Checkpoints: after every evaluation and on a stop, written atomically (`save`). Space for
      one is reserved first, so a full disk is found now, not after an epoch.
    - Signals: the first SIGINT/SIGTERM saves the current step and raises console.Stopped.
    - TensorBoard (`settings.tensorboard`, rank 0): each log entry, with `schedule(step)`'s
      values, and each evaluation, with the PNGs `pictures(entry, folder)` draws into `folder`
      (training/tensorboard.py); a resumed run appends.
    """
    s, dist = settings, distributed.DIST
    device = next(model.parameters()).device
    step, log, history = resume(model, opt, state, s, scaler) if state is not None \
        else (0, [], [])
    if dist.main:
        files.reserve_space(s.out, checkpoints.nbytes(model, *s.reserve))
    fwd = distributed.data_parallel(model, device)
    fwd = torch.compile(fwd) if s.compile else fwd
    running, first_step, train_time = RunningMean(), step, 0.0
    bar = progress.bar(total=s.steps, initial=step, desc=s.desc or s.kind, unit="step",
                       what=f"{s.batch} {s.items} each", announce=True)
    with console.StopSignal() as stop, tensorboard.board(
            s.tensorboard if dist.main else None, step, pictures, schedule) as board:
        stopping = False
        while step < s.steps and not stopping:
            t0 = time.perf_counter()
            epoch, start = divmod(step, s.steps_per_epoch)
            for batch in batches(epoch, start):
                terms = step_fn(fwd, batch, step)
                running.add({k: terms[k] for k in s.logged if k in terms} if s.logged else terms)
                step += 1
                bar.update(1)
                if step % s.log_every == 0:
                    log.append(running.read(step, s.out))
                    board.scalars(log[-1])
                    bar.set_postfix(**{k: f"{log[-1][k]:{form}}" for k, form in s.shown.items()})
                stopping = distributed.should_stop(stop, step, s.log_every, device)
                if step >= s.steps or stopping or (s.eval_every and step % s.eval_every == 0):
                    break
            last = running.read(step, s.out)         # None if the last step was a log step
            if last is not None:
                log.append(last)
                board.scalars(last)
            train_time += time.perf_counter() - t0
            due = step % s.steps_per_epoch == 0 or (s.eval_every and step % s.eval_every == 0)
            if evaluate is not None and (due or step >= s.steps):
                speed = (step - first_step) * s.batch / max(train_time, 1e-9)   # this process's
                history.append({"epoch": step // s.steps_per_epoch, "step": step,
                                "images_per_s": speed, **evaluate(log[-1])})
                board.evaluation(history[-1])
                if dist.main:
                    files.write_json(s.out / s.history, history)
                    if describe is not None:
                        bar.write(describe(history[-1]))
            save(model, opt, s, step, log, history, scaler)
            stopping = stopping or distributed.should_stop(stop, step, s.log_every, device)
    bar.close()
    if stopping:
        if dist.main:
            print(f"stopped at {'' if s.desc is None else s.desc + ' '}step {step}; checkpoint "
                  f"saved to {s.out / s.checkpoint}; continue with --resume")
        distributed.cleanup()
        raise console.Stopped(stop.requested)
    return Trained(step, step / s.steps_per_epoch, log, history, train_time,
                   (step - first_step) * s.batch / max(train_time, 1e-9))


def resume(model, opt, state, settings, scaler=None):
    """Load a checked checkpoint's model and optimiser (whose learning rate from here on is
    `settings.lr`, the typed or saved one, and whose fused or foreach path is this device's),
    the fp16 gradient scaler's state (a checkpoint without one, older or of another precision,
    leaves the scaler fresh) and this rank's RNG state, then set a replaced checkpoint aside
    (checkpoints.set_aside_current). Returns (step, log, history)."""
    path = settings.out / settings.checkpoint
    device = next(model.parameters()).device
    checkpoints.load_state(model, state["model"], settings.kind, path)
    checkpoints.load_state(opt, state["optimizer"], f"{settings.kind} optimiser", path)
    devices.use_adam_paths(opt, device)
    for group in opt.param_groups:
        group["lr"] = settings.lr
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        checkpoints.load_state(scaler, state["scaler"], "gradient scaler", path)
    checkpoints.restore_rng(state, device)
    if settings.set_aside is not None:
        checkpoints.set_aside_current(settings.set_aside, settings.out)
    return state["step"], state["log"], state["history"]


def save(model, opt, settings, step, log, history, scaler=None):
    """The phase's checkpoint in the run folder (rank 0 writes it): the states of the plain
    module, its optimiser and the fp16 gradient scaler (if enabled), the run's record, its
    flags, every rank's RNG state (for an exact resume) and `settings.saved`."""
    device = next(model.parameters()).device
    rngs = distributed.gather_objects(devices.rng_state(device))
    scaling = scaler is not None and scaler.is_enabled()
    if distributed.DIST.main:
        checkpoints.save(settings.out / settings.checkpoint, {
            "kind": settings.kind, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "args": settings.args, "step": step, "epoch": step // settings.steps_per_epoch,
            "log": log, "history": history, "rng": rngs[0],
            "rng_ranks": rngs if distributed.DIST.active else None,
            **({"scaler": scaler.state_dict()} if scaling else {}), **settings.saved})


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
        sums = distributed.all_reduce_sum(self.sums.clone())          # the mean over ranks too
        means = sums / (self.count * distributed.DIST.world)
        values, i, result = means.tolist(), 0, {"step": step}
        for k, n in self.shapes.items():
            result[k] = values[i] if n == 0 else values[i:i + n]
            i += max(n, 1)
        check_finite({k: v for k, v in result.items() if isinstance(v, float)}, step, out)
        self.sums.zero_()
        self.count = 0
        return result


def check_finite(terms, step, out):
    """Stop the run when a loss term is NaN or infinite; the last checkpoint is left untouched."""
    if not all(math.isfinite(v) for v in terms.values()):
        named = ", ".join(f"{k}={v}" for k, v in terms.items())
        ckpt = Path(out) / "checkpoint.pt"
        last = f"the last good checkpoint {ckpt} is untouched" if ckpt.exists() \
            else "no checkpoint had been written yet"
        raise UserError(f"non-finite loss at step {step} ({named}); stopping. {last}; "
                        "try a lower --lr")
