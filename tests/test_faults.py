"""Fault injection: hard kills, Ctrl-C, damaged checkpoints, NaN losses and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import utils
from conftest import ROOT, run_script

RUN = ["--data-root", None, "--limit", 512, "--batch-size", 32, "--eval-limit", 64,
       "--iw-samples", 2, "--log-every", 4, "--device", "cpu", "--epochs", 3]


def args_for(tmp, out, *extra):
    args = list(RUN)
    args[1] = tmp / "data"
    return [*map(str, args), "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run (48 steps) that the interrupted runs must reproduce."""
    tmp = tmp_path_factory.mktemp("straight")
    run_script("standard_vae.py", *args_for(tmp, tmp / "run"))
    return tmp, utils.load_checkpoint(tmp / "run" / "checkpoint.pt")


def same_run(a, b, logs=True):
    assert a["step"] == b["step"]
    if logs:
        assert [r["loss"] for r in a["log"]] == [r["loss"] for r in b["log"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def start(script, args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_same_seed_gives_bit_identical_loss_histories(straight, tmp_path):
    run_script("standard_vae.py", *args_for(tmp_path, tmp_path / "again"))
    same_run(straight[1], utils.load_checkpoint(tmp_path / "again" / "checkpoint.pt"))


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "killed"
    proc = start("standard_vae.py", args_for(tmp_path, out))
    wait_for(out / "checkpoint.pt", proc)                # epoch 1 is checkpointed
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"))
    same_run(straight[1], utils.load_checkpoint(out / "checkpoint.pt"))


def test_ctrl_c_saves_the_current_step_and_resume_continues_exactly(straight, tmp_path):
    out = tmp_path / "interrupted"
    proc = start("standard_vae.py", args_for(tmp_path, out))
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    saved = utils.load_checkpoint(out / "checkpoint.pt")
    assert f"stopped at step {saved['step']}" in stdout and "SIGINT received" in stderr
    assert 16 <= saved["step"] < 48
    assert not (out / "metrics.json").exists()
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"))
    # the stop flushed a partial logging window, so the logs are cut differently from there;
    # the weights, step and the logs up to the stop must match
    resumed = utils.load_checkpoint(out / "checkpoint.pt")
    same_run(straight[1], resumed, logs=False)
    before = [r for r in straight[1]["log"] if r["step"] < saved["step"]]
    assert before == resumed["log"][:len(before)]


def test_first_ctrl_c_requests_a_stop_and_the_second_exits_at_once():
    before = signal.getsignal(signal.SIGINT)
    with utils.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested == "SIGINT"                    # the loop saves and leaves
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before                         # restored


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
    prev = utils.load_checkpoint(out / "checkpoint.prev.pt")
    assert prev["step"] == 32                                    # the epoch-2 checkpoint
    run_script("standard_vae.py", *args_for(tmp_path, out, "--resume", out / "checkpoint.prev.pt",
                                            "--max-steps", 48))
    same_run(straight[1], utils.load_checkpoint(ckpt))
    assert (out / "checkpoint.replaced.pt").exists()             # the damaged file is kept aside


def test_checkpoint_of_another_model_or_other_args_is_a_clear_error(straight, tmp_path):
    source = straight[0] / "run" / "checkpoint.pt"
    out = tmp_path / "other"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(source.read_bytes())
    proc = run_script("beta_vae.py", "--dataset", "dsprites", "--out", out, "--resume",
                      check=False)
    assert proc.returncode == 1
    assert "holds a standard_vae model, not a beta_vae model" in proc.stderr
    state = torch.load(source, weights_only=True)
    state["args"]["latent"] = 7                                  # args that the weights don't fit
    torch.save(state, out / "checkpoint.pt")
    proc = run_script("standard_vae.py", *args_for(tmp_path, out, "--resume"), check=False)
    assert proc.returncode == 1 and "does not fit this standard_vae" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_the_step_and_leaves_the_checkpoint_untouched(tmp_path):
    out = tmp_path / "nan"
    run_script("standard_vae.py", *args_for(tmp_path, out, "--epochs", 1))
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_script("standard_vae.py", *args_for(tmp_path, out, "--resume", "--lr", "1e6"),
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite loss at step" in proc.stderr and "loss=nan" in proc.stderr.lower()
    assert "recon=" in proc.stderr and "kl=" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("script,flags,message", [
    ("standard_vae.py", ["--latent", "0"], "--latent must be positive"),
    ("beta_vae.py", ["--image-size", "30"], "unsupported image size 30"),
    ("beta_vae.py", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ("standard_vae.py", ["--limit", "0"], "--limit must be positive"),
    ("standard_vae.py", ["--limit", "10"], "10 images are fewer than one batch of 128"),
    ("standard_vae.py", ["--out", "{file}/sub"], "cannot write to the output folder"),
    ("standard_vae.py", ["--resume"], "no checkpoint at"),
    ("beta_vae.py", [], "CelebA not found"),
    ("standard_vae.py", ["--sigma", "-1", "--recon", "mse"], "--sigma must be"),
])
def test_bad_flags_and_data_give_one_clear_line(tmp_path, script, flags, message):
    (tmp_path / "file").write_text("not a folder")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    base = ["--data-root", tmp_path / "data", "--eval-limit", 64]
    if "--out" not in flags:
        base += ["--out", tmp_path / "out"]
    proc = run_script(script, *base, *flags, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith(("error:", "usage:", f"{script}: error"))
