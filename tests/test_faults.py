"""Fault injection: hard kills, Ctrl-C, damaged checkpoints, NaN losses and bad input."""
import dataclasses
import importlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from training import checkpoints, console, files
from training.errors import UserError
from conftest import ROOT, run_cli, run_script, write_celeba, write_idx

RUN = ["--data-root", None, "--limit", 512, "--batch-size", 32, "--eval-limit", 64,
       "--iw-samples", 2, "--log-every", 4, "--device", "cpu", "--precision", "fp32", "--epochs", 3]


def args_for(tmp, out, *extra):
    args = list(RUN)
    args[1] = tmp / "data"
    return [*map(str, args), "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run (48 steps) that the interrupted runs must reproduce."""
    tmp = tmp_path_factory.mktemp("straight")
    run_cli("standard_vae.py", *args_for(tmp, tmp / "run"))
    return tmp, checkpoints.load(tmp / "run" / "checkpoint.pt")


def same_run(a, b, logs=True):
    assert a["step"] == b["step"]
    if logs:
        assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def start(script, args):
    """The script as a user starts it from a shell, whose Ctrl-C it receives: SIGINT at its
    default even when pytest runs as a background job (which a shell starts with SIGINT
    ignored, a setting its children would inherit)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def wait_for_line(proc, text, timeout=120):
    """Read the process's output until a line holding `text` (it runs unbuffered)."""
    end = time.time() + timeout
    for line in proc.stdout:
        if text in line:
            return
        assert time.time() < end, f"no line with {text!r}"
    raise AssertionError(f"the process ended without a line with {text!r}: "
                         f"{proc.communicate()}")


@pytest.mark.slow
def test_same_seed_gives_bit_identical_loss_histories(straight, tmp_path):
    run_script("standard_vae.py", *args_for(tmp_path, tmp_path / "again"))
    same_run(straight[1], checkpoints.load(tmp_path / "again" / "checkpoint.pt"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "killed"
    proc = start("standard_vae.py", args_for(tmp_path, out))
    wait_for(out / "checkpoint.pt", proc)                # epoch 1 is checkpointed
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"))
    same_run(straight[1], checkpoints.load(out / "checkpoint.pt"))


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_continues_exactly(straight, tmp_path):
    out = tmp_path / "interrupted"
    proc = start("standard_vae.py", args_for(tmp_path, out))
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr                # a stop, told apart from a finished run
    saved = checkpoints.load(out / "checkpoint.pt")
    assert f"stopped at step {saved['step']}" in stdout and "SIGINT received" in stderr
    assert 16 <= saved["step"] < 48
    assert not (out / "metrics.json").exists()
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"))
    # the stop flushed a partial logging window, so the logs are cut differently from there;
    # the weights, step and the logs up to the stop must match
    resumed = checkpoints.load(out / "checkpoint.pt")
    same_run(straight[1], resumed, logs=False)
    before = [r for r in straight[1]["log"] if r["step"] < saved["step"]]
    assert before == resumed["log"][:len(before)]


def test_first_ctrl_c_requests_a_stop_and_the_second_exits_at_once():
    before = signal.getsignal(signal.SIGINT)
    with console.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested == "SIGINT"                    # the loop saves and leaves
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before                         # restored


@pytest.mark.slow
def test_damaged_checkpoint_names_the_previous_one_which_resume_can_use(straight, tmp_path):
    out = tmp_path / "damaged"
    run_script("standard_vae.py", *args_for(tmp_path, out, "--max-steps", 40))
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])                   # a full disk cut it short
    proc = run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "damaged" in proc.stderr and f"--resume {out / 'checkpoint.prev.pt'}" in proc.stderr
    analysis = run_script("beta_vae_analyze.py", "--checkpoint", ckpt, "--traverse", check=False)
    assert analysis.returncode == 1 and "checkpoint.prev.pt" in analysis.stderr
    prev = checkpoints.load(out / "checkpoint.prev.pt")
    assert prev["step"] == 32                                    # the epoch-2 checkpoint
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume", out / "checkpoint.prev.pt",
                                            "--max-steps", 48))
    same_run(straight[1], checkpoints.load(ckpt))
    assert (out / "checkpoint.replaced.pt").exists()             # the damaged file is kept aside


def test_checkpoint_of_another_model_or_other_args_is_a_clear_error(finished, tmp_path):
    source = finished / "checkpoint.pt"
    out = tmp_path / "other"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(source.read_bytes())
    proc = run_cli("beta_vae.py", "--dataset", "dsprites", "--out", out, "--resume",
                   check=False)
    assert proc.returncode == 1
    assert "holds a standard_vae model, not a beta_vae model" in proc.stderr
    state = torch.load(source, weights_only=True)
    state["args"]["latent"] = 7                                  # args that the weights don't fit
    torch.save(state, out / "checkpoint.pt")
    proc = run_cli("standard_vae.py", "--data-root", tmp_path / "data", "--out", out, "--resume",
                   check=False)
    assert proc.returncode == 1 and "does not fit this standard_vae" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_the_step_and_leaves_the_checkpoint_untouched(tmp_path):
    out = tmp_path / "nan"
    run_cli("standard_vae.py", *data(tmp_path), "--epochs", 1, "--out", out)
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli("standard_vae.py", *data(tmp_path), "--out", out, "--resume", "--epochs", 3,
                   "--lr", "1e6", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite loss at step" in proc.stderr and "loss=nan" in proc.stderr.lower()
    assert "recon=" in proc.stderr and "kl=" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("script,flags,message", [
    ("standard_vae.py", ["--latent", "0"], "--latent: must be a positive integer"),
    ("beta_vae.py", ["--image-size", "30"], "unsupported image size 30"),
    ("beta_vae.py", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ("standard_vae.py", ["--limit", "0"], "--limit: must be a positive integer"),
    ("standard_vae.py", ["--limit", "10"], "10 images are fewer than one batch of 128"),
    ("standard_vae.py", ["--out", "{file}/sub"], "cannot write to the output folder"),
    ("standard_vae.py", ["--resume"], "no checkpoint at"),
    ("beta_vae.py", [], "CelebA not found"),
    ("standard_vae.py", ["--sigma", "-1", "--recon", "mse"], "--sigma: must be"),
])
def test_bad_flags_and_data_give_one_clear_line(tmp_path, script, flags, message):
    (tmp_path / "file").write_text("not a folder")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    base = ["--data-root", tmp_path / "data", "--eval-limit", 64]
    if "--out" not in flags:
        base += ["--out", tmp_path / "out"]
    proc = run_cli(script, *base, *flags, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith(("error:", "usage:", f"{script}: error"))


# ----------------------------------------------------------------------------------------------
# Every file is untrusted: one table, one row per fault. Each row runs a command as a user
# would and asserts its exit status, that stderr has no traceback, the line that explains, and
# that the files that must survive are byte for byte what they were.
# ----------------------------------------------------------------------------------------------

TINY = ["--limit", 256, "--batch-size", 32, "--eval-limit", 32, "--iw-samples", 2,
        "--log-every", 4, "--device", "cpu", "--precision", "fp32", "--width", 8, "--hidden", 32,
        "--latent", 4]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch Standard VAE run on dSprites (checkpoint.pt, .prev.pt, metrics)."""
    tmp = tmp_path_factory.mktemp("finished")
    run_cli("standard_vae.py", "--data-root", tmp / "data", *TINY, "--epochs", 2,
            "--out", tmp / "run")
    return tmp / "run"


@dataclasses.dataclass
class Row:
    script: str
    args: list
    status: int
    message: str
    keep: list = dataclasses.field(default_factory=list)      # byte-identical afterwards
    absent: list = dataclasses.field(default_factory=list)    # must not exist afterwards
    limit_file_size: int | None = None                        # RLIMIT_FSIZE: a full disk
    subprocess: bool = False          # as a user runs it (slow here: torch loads in ~10 s)


def run_in_process(script, args, capsys):
    """(exit status, stderr) of `script`'s main(parse_args(args)) in this process, which is
    what the command runs; an unexpected exception propagates and fails the test."""
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    try:
        module.main(module.parse_args([str(a) for a in args]))
        status = 0
    except UserError as e:                   # what console.run_command does with it
        status = 1
        print(f"error: {e}", file=sys.stderr)
    except SystemExit as e:                  # what Python does with it at the top level
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    return status, capsys.readouterr().err


def run_row(row, capsys):
    before = {p: p.read_bytes() for p in row.keep}
    limit = row.limit_file_size
    if row.subprocess or limit:
        proc = subprocess.run(
            [sys.executable, str(ROOT / row.script), *map(str, row.args)], cwd=ROOT, text=True,
            capture_output=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
            if limit else None)
        status, stderr = proc.returncode, proc.stderr
    else:
        status, stderr = run_in_process(row.script, row.args, capsys)
    assert status == row.status, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert row.message in (stderr.strip().splitlines() or [""])[-1], stderr[-2000:]
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} changed"
    for p in row.absent:
        assert not p.exists() and not p.is_symlink(), f"{p} exists"


def leftovers(folder):
    """Temporary files that a write left behind (none may survive a failure)."""
    return [p for p in Path(folder).rglob(".*") if p.name not in (".lock", ".build.lock")]


def copy_run(finished, tmp):
    run = tmp / "run"
    shutil.copytree(finished, run)
    return run


def data(tmp):
    return ["--data-root", tmp / "data", *TINY]


# ---- 1. data loss ------------------------------------------------------------------------------
def fresh_run_in_a_run_folder(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("standard_vae.py", [*data(tmp), "--out", run], 1, "--overwrite",
               keep=[run / "checkpoint.pt", run / "checkpoint.prev.pt", run / "metrics.json"],
               subprocess=True)


def other_script_in_a_run_folder(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("vq_vae.py", ["--dataset", "dsprites", "--data-root", tmp / "data", "--limit", 64,
                             "--out", run], 1, "already holds a run",
               keep=[run / "checkpoint.pt", run / "checkpoint.prev.pt"])


def failed_resume_from_a_file_that_does_not_fit(finished, tmp):
    run = copy_run(finished, tmp)
    state = torch.load(run / "checkpoint.prev.pt", weights_only=True)
    state["args"]["hidden"] = 64                       # args the weights don't fit
    torch.save(state, tmp / "other.pt")
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", tmp / "other.pt",
                                   "--hidden", 64], 1, "does not fit",
               keep=[run / "checkpoint.pt", run / "checkpoint.prev.pt"],
               absent=[run / "checkpoint.replaced.pt"])


def failed_resume_from_another_model(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("beta_vae.py", ["--dataset", "dsprites", "--out", run, "--resume",
                               run / "checkpoint.prev.pt"], 1, "not a beta_vae model",
               keep=[run / "checkpoint.pt"], absent=[run / "checkpoint.replaced.pt"])


def folder_named_checkpoint(finished, tmp):
    (tmp / "run" / "checkpoint.pt").mkdir(parents=True)
    return Row("standard_vae.py", [*data(tmp), "--out", tmp / "run"], 1,
               "checkpoint.pt is not a regular file", absent=[tmp / "run" / "history.json"])


def folder_named_metrics_on_resume(finished, tmp):
    run = copy_run(finished, tmp)
    (run / "metrics.json").unlink()
    (run / "metrics.json").mkdir()
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 1,
               "metrics.json is not a regular file", keep=[run / "checkpoint.pt"])


def full_disk_on_a_fresh_run(finished, tmp):
    return Row("standard_vae.py", [*data(tmp), "--out", tmp / "run"], 1, "no room for a checkpoint",
               absent=[tmp / "run" / "checkpoint.pt"], limit_file_size=2**20)


def full_disk_on_resume(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 1,
               "no room for a checkpoint", keep=[run / "checkpoint.pt", run / "checkpoint.prev.pt"],
               limit_file_size=2**20)


def full_disk_on_a_vq_run(finished, tmp):
    return Row("vq_vae.py", ["--dataset", "dsprites", "--data-root", tmp / "data", "--limit", 64,
                             "--batch-size", 32, "--eval-limit", 16, "--hidden", 16,
                             "--res-hidden", 8, "--res-layers", 1, "--codes", 16,
                             "--latent", 8, "--epochs", 1, "--device", "cpu", "--precision", "fp32",
                             "--prior-epochs", 1, "--prior-batch-size", 32, "--out",
                             tmp / "run"], 1, "no room for a checkpoint",
               absent=[tmp / "run" / "checkpoint.pt"], limit_file_size=2**16)


def bench_into_a_celeba_folder_without_partitions(finished, tmp):
    folder = tmp / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "img_align_celeba" / "000001.jpg").write_bytes(b"a user's photo")
    (folder / "list_attr_celeba.txt").write_text("1\nSmiling\n000001.jpg 1\n")
    return Row("bench.py", ["--data-root", tmp, "--images", 16, "--batch-size", 8], 1,
               "was not created by bench.py",
               keep=[folder / "img_align_celeba" / "000001.jpg", folder / "list_attr_celeba.txt"],
               absent=[folder / "list_eval_partition.txt"])


def bench_into_a_mirror_layout(finished, tmp):
    folder = tmp / "celeba"
    (folder / "img_align_celeba" / "img_align_celeba").mkdir(parents=True)
    photo = folder / "img_align_celeba" / "img_align_celeba" / "000001.jpg"
    photo.write_bytes(b"a user's photo")
    (folder / "list_attr_celeba.csv").write_text("image_id,Smiling\n000001.jpg,1\n")
    return Row("bench.py", ["--data-root", tmp, "--images", 16, "--batch-size", 8], 1,
               "was not created by bench.py", keep=[photo, folder / "list_attr_celeba.csv"],
               absent=[folder / "img_align_celeba" / "000001.jpg",
                       folder / "list_attr_celeba.txt"])


# ---- 2. code execution and unsafe writes -------------------------------------------------------
class Payload:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def cifar_batches(tmp, poison=None, n=40, value=None):
    """CIFAR-10 batches in the real format (pickled dicts); `poison` goes into data_batch_1."""
    folder = tmp / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8) if value is None \
            else np.full((n, 3072), value, np.uint8)
        batch = {"data": pixels, "labels": rng.integers(0, 10, n).tolist()}
        if poison is not None and name == "data_batch_1":
            batch["filenames"] = poison
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def cifar_batch_that_runs_a_command(finished, tmp):
    cifar_batches(tmp, Payload(os.system, f"touch {tmp / 'pwned'}"))
    return Row("standard_vae.py", ["--dataset", "cifar10", "--data-root", tmp / "data",
                                   "--out", tmp / "run"], 1, "refused, not run",
               absent=[tmp / "pwned"], subprocess=True)


def cifar_batch_that_calls_eval(finished, tmp):
    cifar_batches(tmp, Payload(eval, f"open({str(tmp / 'pwned')!r}, 'w')"))
    return Row("vq_vae.py", ["--dataset", "cifar10", "--data-root", tmp / "data",
                             "--out", tmp / "run"], 1, "eval, which no CIFAR",
               absent=[tmp / "pwned"])


def symlinks_planted_at_temporary_names(finished, tmp):
    run = copy_run(finished, tmp)
    victim = tmp / "victim.txt"
    victim.write_text("precious")
    for name in (".checkpoint.pt.tmp", ".history.json.tmp", ".metrics.json.tmp",
                 ".checkpoint.prev.pt.tmp", ".losses.png.tmp"):
        (run / name).symlink_to(victim)
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 0, "",
               keep=[victim])


def symlink_planted_at_an_output(finished, tmp):
    run = copy_run(finished, tmp)
    victim = tmp / "victim.json"
    victim.write_text("precious")
    (run / "metrics.json").unlink()
    (run / "metrics.json").symlink_to(victim)      # replaced by the new file, never written
    (run / "samples.png").unlink()
    (run / "samples.png").symlink_to(victim)
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 0, "",
               keep=[victim])


def symlink_planted_at_the_lock(finished, tmp):
    run = copy_run(finished, tmp)
    victim = tmp / "victim.txt"
    victim.write_text("precious")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(victim)
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 1,
               "cannot lock", keep=[victim, run / "checkpoint.pt"], subprocess=True)


# ---- 3. no traceback for a damaged file or a bad number ---------------------------------------
def dsprites_cache(tmp, content):
    cache = tmp / "data" / "dsprites" / utils.DSPRITES_CACHE
    cache.parent.mkdir(parents=True)
    if isinstance(content, np.ndarray):
        np.save(cache, content)
    else:
        cache.write_bytes(content)
    return cache


def truncated_npy():
    import io
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                             "shape": (737280, 64, 64)})
    return f.getvalue() + bytes(4096)


def damaged_dsprites_cache(content, message):
    def row(finished, tmp):
        cache = dsprites_cache(tmp, content() if callable(content) else content)
        return Row("standard_vae.py", [*data(tmp), "--out", tmp / "run"], 1, message,
                   keep=[cache], absent=[tmp / "run" / "checkpoint.pt"])
    row.__name__ = f"dsprites_cache_{message.split()[0]}"
    return row


def truncated_celeba_cache(finished, tmp):
    write_celeba(tmp / "data")
    utils.load_dataset("celeba", tmp / "data", "test")
    cache = tmp / "data" / "celeba" / "celeba_cache_crop148_64px.npy"
    cache.write_bytes(cache.read_bytes()[:5000])
    return Row("standard_vae.py", ["--dataset", "celeba", "--data-root", tmp / "data",
                                   "--eval-limit", 4, "--batch-size", 4, "--out", tmp / "run"],
               1, "delete it and rerun", keep=[cache])


def mnist_files(tmp, images_bytes=None):
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    bad = raw / "train-images-idx3-ubyte"
    if images_bytes:
        bad.write_bytes(images_bytes(bad.read_bytes()))
    return bad


def mnist_bad_magic(finished, tmp):
    bad = mnist_files(tmp, lambda b: b"\x00\x00\x0c\x03" + b[4:])
    return Row("standard_vae.py", ["--dataset", "mnist", "--data-root", tmp / "data",
                                   "--out", tmp / "run"], 1, "magic number", keep=[bad])


def checkpoint_with(change, message):
    def row(finished, tmp):
        run = copy_run(finished, tmp)
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, run / "checkpoint.pt")
        return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--epochs", 3], 1,
                   message, keep=[run / "checkpoint.pt", run / "checkpoint.prev.pt"],
                   absent=[run / "checkpoint.replaced.pt"])
    row.__name__ = f"checkpoint_{message.split()[0]}"
    return row


def analysis_of_a_checkpoint_without_its_data_entry(finished, tmp):
    run = copy_run(finished, tmp)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["data"]
    torch.save(state, run / "checkpoint.pt")
    return Row("beta_vae_analyze.py", ["--checkpoint", run / "checkpoint.pt", "--traverse"], 1,
               "lacks or garbles what rebuilds its model", keep=[run / "checkpoint.pt"],
               absent=[run / "traversal.png"])


def flag(script, *args, message, status=2, subprocess=False):
    def row(finished, tmp):
        return Row(script, [*args, "--out", tmp / "run"] if script != "beta_vae_analyze.py"
                   else list(args), status, message, absent=[tmp / "run"],
                   subprocess=subprocess)
    row.__name__ = f"{script}_{'_'.join(args)}"
    return row


# ---- 4. messages that point the right way -----------------------------------------------------
def resume_with_another_latent(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("standard_vae.py", [*data(tmp), "--out", run, "--resume", "--latent", 20], 1,
               "--latent cannot change on --resume", keep=[run / "checkpoint.pt"])


def resume_with_another_dataset(finished, tmp):
    run = copy_run(finished, tmp)
    return Row("standard_vae.py", ["--dataset", "mnist", "--out", run, "--resume"], 1,
               "--dataset cannot change on --resume", keep=[run / "checkpoint.pt"])


def nan_weights_in_the_checkpoint(finished, tmp):
    def poison(state):
        next(iter(state["model"].values())).fill_(float("nan"))
    return checkpoint_with(poison, "holds non-finite weights")(finished, tmp)


def vq_vae_on_constant_data(finished, tmp):
    cifar_batches(tmp, value=128)
    return Row("vq_vae.py", ["--dataset", "cifar10", "--data-root", tmp / "data", "--limit", 64,
                             "--batch-size", 32, "--out", tmp / "run"], 1,
               "zero pixel variance", absent=[tmp / "run" / "checkpoint.pt"])


def truncated_mnist(finished, tmp):
    bad = mnist_files(tmp, lambda b: b[:len(b) // 2])
    return Row("standard_vae.py", ["--dataset", "mnist", "--data-root", tmp / "data",
                                   "--out", tmp / "run"], 1, "cut short", keep=[bad])


def attribute(value, message):
    def row(finished, tmp):
        return Row("beta_vae_analyze.py", ["--checkpoint", finished / "checkpoint.pt",
                                           "--data-root", tmp / "data", "--out", tmp,
                                           "--n-images", 200, *value], 1, message,
                   keep=[finished / "checkpoint.pt"])
    row.__name__ = f"attribute_{'_'.join(value)}"
    return row


ROWS = [
    # 1. data loss
    fresh_run_in_a_run_folder, other_script_in_a_run_folder,
    failed_resume_from_a_file_that_does_not_fit, failed_resume_from_another_model,
    folder_named_checkpoint, folder_named_metrics_on_resume, full_disk_on_a_fresh_run,
    full_disk_on_resume, full_disk_on_a_vq_run,
    bench_into_a_celeba_folder_without_partitions, bench_into_a_mirror_layout,
    # 2. code execution and unsafe writes
    cifar_batch_that_runs_a_command, cifar_batch_that_calls_eval,
    symlinks_planted_at_temporary_names, symlink_planted_at_an_output,
    symlink_planted_at_the_lock,
    # 3. tracebacks: damaged files
    damaged_dsprites_cache(b"garbage" * 100, "is not a complete .npy file"),
    damaged_dsprites_cache(b"", "is not a complete .npy file (No data"),
    damaged_dsprites_cache(truncated_npy, "is not a complete .npy file (mmap"),
    damaged_dsprites_cache(np.zeros((4, 64, 64), np.uint8), "holds uint8 [4, 64, 64]"),
    truncated_celeba_cache, mnist_bad_magic,
    checkpoint_with(lambda s: s.pop("optimizer"), "'optimizer' is missing"),
    checkpoint_with(lambda s: s.update(optimizer=[1, 2]), "'optimizer' is a list"),
    checkpoint_with(lambda s: s.update(step="12"), "'step' is a str"),
    checkpoint_with(lambda s: s.update(step=-3), "expected a step >= 0"),
    checkpoint_with(lambda s: s.update(rng={"torch": 1}), "random-number state is malformed"),
    analysis_of_a_checkpoint_without_its_data_entry,
    # 3. tracebacks: numbers, checked as they are parsed
    flag("standard_vae.py", "--log-every", "0", message="--log-every: must be a positive"),
    flag("standard_vae.py", "--width", "0", message="--width: must be a positive integer"),
    flag("standard_vae.py", "--lr", "nan", message="--lr: must be a positive number, got nan",
         subprocess=True),
    flag("beta_vae.py", "--sigma", "abc", message="--sigma: expected a positive number"),
    flag("beta_vae.py", "--gamma", "inf", message="--gamma: must be a number >= 0"),
    flag("vq_vae.py", "--decay", "1", message="--decay: must be a number in (0, 1)"),
    flag("vq_vae.py", "--codes", "1", message="--codes: must be an integer >= 2"),
    flag("beta_vae_analyze.py", "--checkpoint", "x.pt", "--attribute", "scale",
         "--strengths=1:2:-3", message="bad --strengths '1:2:-3'", status=1),
    flag("beta_vae_analyze.py", "--checkpoint", "x.pt", "--seeds", "0",
         message="--seeds: must be a positive integer"),
    flag("beta_vae_analyze.py", "--checkpoint", "x.pt", "--points", "0",
         message="--points: must be an integer >= 2"),
    flag("bench.py", "--models", "foo", message="--models: unknown model foo"),
    flag("bench.py", "--steps", "0", message="--steps: must be a positive integer"),
    # 4. messages
    resume_with_another_latent, resume_with_another_dataset, nan_weights_in_the_checkpoint,
    vq_vae_on_constant_data, truncated_mnist,
    attribute(["--attribute", "shape=7"], "shape takes one of square, ellipse, heart"),
    attribute(["--attribute", "scale", "--condition", "shape=3"], "a class number 0 to 2"),
    attribute(["--attribute", "scale", "--images", "600"],
              "indices 0 to 199 into the first --n-images 200 test images"),
]


# rows that run the command in a process of its own (a full disk needs one) are journeys: the
# slow tier; the --lr nan row stays in the default tier, the one check there that a script
# started as a command reports a bad flag with its exit status and one line
JOURNEYS = {"fresh_run_in_a_run_folder", "full_disk_on_a_fresh_run", "full_disk_on_resume",
            "full_disk_on_a_vq_run", "cifar_batch_that_runs_a_command",
            "symlink_planted_at_the_lock"}


@pytest.mark.parametrize("make", [pytest.param(r, marks=pytest.mark.slow)
                                  if r.__name__ in JOURNEYS else r for r in ROWS],
                         ids=[r.__name__ for r in ROWS])
def test_fault(make, finished, tmp_path, capsys):
    row = make(finished, tmp_path)
    run_row(row, capsys)
    assert leftovers(tmp_path) == [] or all(p.is_symlink() for p in leftovers(tmp_path))


# ---- the mechanisms themselves ----------------------------------------------------------------
def test_overwrite_replaces_the_old_run_and_leaves_no_trace_of_it(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    old = (run / "checkpoint.pt").read_bytes()
    assert run_in_process("standard_vae.py", [*data(tmp_path), "--epochs", 1, "--seed", 1,
                                              "--out", run, "--overwrite"], capsys)[0] == 0
    state = checkpoints.load(run / "checkpoint.pt")
    assert state["step"] == 8 and state["args"]["seed"] == 1
    assert (run / "checkpoint.pt").read_bytes() != old
    assert not (run / "checkpoint.prev.pt").exists()        # the old run's, deleted first


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    first = start("standard_vae.py", [*map(str, [*data(tmp_path), "--epochs", 1000, "--out",
                                                 out])])
    wait_for(out / "history.json", first)                  # it is training, past epoch 1
    second = run_script("standard_vae.py", *data(tmp_path), "--seed", 1, "--out", out,
                        "--overwrite", check=False)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"is in use by pid {first.pid}" in second.stderr
    assert first.poll() is None                            # still training
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    state = checkpoints.load(out / "checkpoint.pt")
    assert state["step"] > 8 and state["args"]["seed"] == 0        # the first run's, whole
    assert leftovers(out) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, {"model": {}, "args": {}, "step": 1})
    before = path.read_bytes()

    def disk_full(f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match="No space left on device.*left as it was"):
        files.atomic_write(path, disk_full, keep_previous=True)
    with pytest.raises(KeyboardInterrupt):                    # Ctrl-C mid-write
        files.atomic_write(path, lambda f: (f.write(b"x"), (_ for _ in ()).throw(
            KeyboardInterrupt())))
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert not (tmp_path / "checkpoint.prev.pt").exists()


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """Each write goes through its own O_EXCL temporary: interleaved writers each leave a
    whole file, never a mix (the old fixed `.name.tmp` was shared)."""
    path = tmp_path / "history.json"
    with files.replacing(path) as a, files.replacing(path) as b:
        assert a != b and a.exists() and b.exists()
        a.write_text("[1]")
        b.write_text("[2]")
    assert path.read_text() == "[1]" and leftovers(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_while_rendering_dsprites_leaves_no_partial_cache(tmp_path):
    """More than 100,000 images make the first run render the full grid into a cache."""
    folder = tmp_path / "data" / "dsprites"
    proc = start("standard_vae.py", ["--data-root", str(tmp_path / "data"), "--limit",
                                     "200000", "--out", str(tmp_path / "run")])
    end = time.time() + 120
    while not list(folder.glob(".*partial.npy")):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "SIGINT received: stopped" in stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in folder.iterdir()) == [".build.lock"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_stops_cleanly(tmp_path, sig, status):
    """After the last step, the IW-NLL with many samples is the long phase: a stop there keeps
    the final checkpoint whole and writes no metrics."""
    out = tmp_path / "run"
    args = [*map(str, [*data(tmp_path), "--epochs", 1, "--out", out])]
    args[args.index("--iw-samples") + 1] = "5000"
    proc = start("standard_vae.py", args)
    wait_for_line(proc, "IW-NLL: K=5000")                  # trained, and scoring
    saved = (out / "checkpoint.pt").read_bytes()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status and "Traceback" not in stderr, stderr
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert not (out / "metrics.json").exists() and leftovers(out) == []


def test_vq_vae_with_fewer_held_out_images_than_a_grid_row_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    status, stderr = run_in_process("vq_vae.py", [
        "--dataset", "dsprites", "--data-root", tmp_path / "data", "--limit", 64,
        "--batch-size", 32, "--eval-limit", 12, "--hidden", 16, "--res-hidden", 8,
        "--res-layers", 1, "--codes", 16, "--latent", 8, "--epochs", 1, "--device", "cpu",
        "--precision", "fp32",
        "--prior-epochs", 1, "--prior-batch-size", 32, "--prior-channels", 8,
        "--prior-layers", 2, "--prior-kernel", 3, "--out", out], capsys)
    assert status == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["images"] == 12 and "prior" in metrics
    assert (out / "reconstructions.png").stat().st_size > 0
