"""--tensorboard: what each script logs (read back with TensorBoard's own reader), a resumed run
appending to the same log, a stop by a signal flushing it, the one-line error without the
package, and nothing imported (and nothing changed in training) without the flag."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import beta_vae as bv
from conftest import ROOT
from training import checkpoints

NO_TENSORBOARD = ("the tensorboard package is not installed (pip install tensorboard; CI "
                  "installs it)")
# tiny configurations: 256 images in batches of 32 (8 steps an epoch), a log every 2 steps
TINY = ["--limit", 256, "--batch-size", 32, "--eval-limit", 64, "--log-every", 2,
        "--device", "cpu", "--precision", "fp32"]
BETA = [*TINY, "--dataset", "dsprites", "--latent", 4, "--iw-samples", 0]
PNG_ROWS = lambda rows: (8 * 66 + 2, rows * 66 + 2)     # noqa: E731  8 tiles of 64 px a row


def read_events(folder):
    """TensorBoard's reader on a run folder, keeping every scalar and image."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                             reason=NO_TENSORBOARD)
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def steps(acc, tag):
    return [e.step for e in (acc.Images(tag) if tag.startswith("images/") else
                             acc.Scalars(tag))]


def values(acc, tag):
    return [e.value for e in acc.Scalars(tag)]


@pytest.fixture
def tensorboard():
    pytest.importorskip("torch.utils.tensorboard", reason=NO_TENSORBOARD)


def test_standard_vae_logs_terms_scores_and_images(tmp_path, cli, tensorboard):
    out = tmp_path / "run"
    cli("standard_vae.py", *TINY, "--data-root", tmp_path / "data", "--iw-samples", 0,
        "--width", 16, "--hidden", 64, "--epochs", 2, "--out", out, "--tensorboard")
    acc = read_events(out)
    state = checkpoints.load(out / "checkpoint.pt")
    history = json.loads((out / "history.json").read_text())
    logged = [2, 4, 6, 8, 10, 12, 14, 16]
    for tag in ("train/loss", "train/recon", "train/kl", "train/kl_dims/0", "train/kl_dims/9"):
        assert steps(acc, tag) == logged, tag
    # the scalars are the training log's (stored as float32 by TensorBoard)
    assert values(acc, "train/loss") == pytest.approx([r["loss"] for r in state["log"]], 1e-6)
    assert values(acc, "train/kl_dims/3") == pytest.approx(
        [r["kl_dims"][3] for r in state["log"]], 1e-6)
    for key in ("test_neg_elbo", "test_kl", "test_recon", "test_active_units", "kl_per_dim/9"):
        assert steps(acc, f"eval/{key}") == [8, 16], key
    assert values(acc, "eval/test_neg_elbo") == pytest.approx(
        [h["test_neg_elbo"] for h in history], 1e-6)
    assert 0 <= values(acc, "eval/test_active_units")[-1] <= 10
    for name in ("reconstructions", "samples"):
        assert steps(acc, f"images/{name}") == [8, 16], name
        image = acc.Images(f"images/{name}")[-1]
        assert (image.width, image.height) == PNG_ROWS(2), name    # 8 pairs; 16 samples


def test_beta_vae_logs_tc_terms_beta_mig_and_traversal(tmp_path, cli, tensorboard):
    out = tmp_path / "run"
    cli("beta_vae.py", *BETA, "--data-root", tmp_path / "data", "--objective", "TC",
        "--beta-warmup", 8, "--max-steps", 12, "--eval-every", 6, "--mig-points", 300,
        "--out", out, "--tensorboard")
    acc = read_events(out)
    for tag in ("train/loss", "train/recon", "train/kl", "train/mi", "train/tc", "train/dim_kl",
                "train/kl_dims/3", "train/beta"):
        assert steps(acc, tag) == [2, 4, 6, 8, 10, 12], tag
    # beta, warmed up from 0 to 6 over 8 steps, as the loss saw it at each logged step
    assert values(acc, "train/beta") == pytest.approx([bv.beta_at(s, 6.0, 8)
                                                       for s in (2, 4, 6, 8, 10, 12)])
    evaluations = [6, 8, 12]                  # every 6 steps, the epoch's end and the last step
    for key in ("test_neg_elbo", "test_kl", "test_active_units", "kl_per_dim/3", "mig"):
        assert steps(acc, f"eval/{key}") == evaluations, key
    assert all(0 <= v <= 1 for v in values(acc, "eval/mig"))
    for name in ("reconstructions", "samples", "traversal"):
        assert steps(acc, f"images/{name}") == evaluations, name
    assert acc.Images("images/traversal")[-1].height == 4 * 66 + 2    # a row for each latent


def test_vq_vae_and_prior_log_commitment_perplexity_bits_and_images(tmp_path, cli, tensorboard):
    out = tmp_path / "run"
    cli("vq_vae.py", *TINY, "--data-root", tmp_path / "data", "--hidden", 16, "--res-hidden",
        8, "--res-layers", 1, "--codes", 32, "--latent", 8, "--prior-channels", 16,
        "--prior-layers", 3, "--prior-kernel", 3, "--prior-batch-size", 32, "--epochs", 1,
        "--prior-epochs", 1, "--out", out, "--tensorboard")
    acc = read_events(out)
    for tag in ("train/loss", "train/recon_error", "train/commitment", "train/perplexity"):
        assert steps(acc, tag) == [2, 4, 6, 8], tag
    assert all(1 <= v <= 32 for v in values(acc, "train/perplexity"))
    for key in ("test_recon_error", "test_perplexity", "test_used_codes", "test_psnr"):
        assert steps(acc, f"eval/{key}") == [8], key
    assert steps(acc, "images/reconstructions") == [8]
    assert (acc.Images("images/reconstructions")[0].width,
            acc.Images("images/reconstructions")[0].height) == PNG_ROWS(2)
    # the prior, a phase of its own steps, in a folder of its own
    prior = read_events(out / "prior")
    assert steps(prior, "train/bits_per_code")[-1] == 8
    assert steps(prior, "eval/test_bits_per_code") == [8]
    assert values(prior, "eval/test_bits_per_code") == pytest.approx(
        [json.loads((out / "metrics.json").read_text())["prior"]["test_bits_per_code"]], 1e-6)
    assert steps(prior, "images/samples") == [8]
    assert not any(tag.startswith("train/bits") for tag in acc.Tags()["scalars"])


def next_second(folder):
    """Wait until the clock has passed the second in which the newest event file of `folder`
    was named: event files are named by the second they were opened in, and TensorBoard reads
    a folder's files in name order (a resume seconds after a run, as in a test, could sort
    first)."""
    newest = max(int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*"))
    time.sleep(max(0.0, newest + 1 - time.time()))


def test_resume_appends_purges_and_a_signal_flushes(tmp_path, cli, monkeypatch, tensorboard):
    out = tmp_path / "run"
    flags = [*BETA, "--data-root", tmp_path / "data", "--objective", "B", "--c-steps", 100,
             "--mig-points", 0, "--out", out]
    common = [*flags, "--max-steps", 12, "--eval-every", 6]
    # a run that saves at steps 6, 8 (the epoch's end) and 12, leaving step 8 in
    # checkpoint.prev.pt: resuming from it, the log holds events past its step, as that of a
    # run killed after step 8 would
    cli("beta_vae.py", *common, "--tensorboard")
    assert checkpoints.load(out / "checkpoint.prev.pt")["step"] == 8
    next_second(out)
    # resumed from step 8 and stopped by SIGINT during step 9 (the flag is the checkpoint's)
    step_9 = bv.train_step

    def interrupted(model, opt, x, step, *rest, **named):
        if step == 8:                                   # the 9th step (counted from 0)
            os.kill(os.getpid(), signal.SIGINT)
        return step_9(model, opt, x, step, *rest, **named)

    monkeypatch.setattr(bv, "train_step", interrupted)
    proc = cli("beta_vae.py", *common, "--resume", out / "checkpoint.prev.pt", check=False)
    assert proc.returncode == 130, proc.stderr
    monkeypatch.setattr(bv, "train_step", step_9)
    # what the stopped run wrote is on disk: its writer was closed on the way out
    assert steps(read_events(out), "train/loss") == [2, 4, 6, 8, 9]
    next_second(out)
    cli("beta_vae.py", *common, "--resume")
    acc = read_events(out)
    assert len(list(out.glob("events.out.tfevents.*"))) == 3         # one log, three sessions
    # steps continue, each once: the first run's steps 10 and 12 were purged
    assert steps(acc, "train/loss") == [2, 4, 6, 8, 9, 10, 12]
    assert steps(acc, "train/capacity") == [2, 4, 6, 8, 9, 10, 12]
    assert values(acc, "train/capacity") == pytest.approx(
        [bv.capacity(s, 25.0, 100) for s in (2, 4, 6, 8, 9, 10, 12)])
    assert steps(acc, "eval/test_neg_elbo") == [6, 8, 12]      # the evaluation at 8 is kept
    assert steps(acc, "images/traversal") == [6, 8, 12]
    final = checkpoints.load(out / "checkpoint.pt")
    assert values(acc, "train/loss") == pytest.approx([r["loss"] for r in final["log"]], 1e-6)

    # a fresh run in the folder (--overwrite) starts a fresh log
    cli("beta_vae.py", *flags, "--max-steps", 2, "--overwrite", "--tensorboard")
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert steps(read_events(out), "train/loss") == [2]


def test_without_the_package_the_run_stops_in_one_line(tmp_path, cli, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):      # as if it were not installed
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    proc = cli("beta_vae.py", *BETA, "--data-root", tmp_path / "data", "--max-steps", 2,
               "--out", out, "--tensorboard", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "--tensorboard needs the tensorboard package" in proc.stderr
    assert proc.stderr.strip().endswith("pip install tensorboard")
    assert not (out / "checkpoint.pt").exists() and not (tmp_path / "data").exists()


def test_without_the_flag_nothing_imports_tensorboard_and_training_is_the_same(
        tmp_path, cli, tensorboard):
    args = [*BETA, "--data-root", tmp_path / "data", "--max-steps", 4, "--eval-every", 2,
            "--mig-points", 0]
    code = ("import sys, beta_vae; from training import console; "
            f"sys.argv = ['beta_vae.py', *{list(map(str, args))!r}, '--out', sys.argv[1]]; "
            "console.run_command(beta_vae.main, beta_vae.parse_args); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard' "
            "or m.startswith('torch.utils.tensorboard')))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "plain")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert not list((tmp_path / "plain").glob("events.out.tfevents.*"))
    # the images TensorBoard draws at every evaluation take nothing from the training RNG
    cli("beta_vae.py", *args, "--out", tmp_path / "watched", "--tensorboard")
    a = checkpoints.load(tmp_path / "plain" / "checkpoint.pt")
    b = checkpoints.load(tmp_path / "watched" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_writes(tmp_path, tensorboard):
    from conftest import torchrun
    out = tmp_path / "run"
    torchrun(ROOT / "beta_vae.py", *BETA, "--data-root", tmp_path / "data", "--batch-size", 16,
             "--max-steps", 6, "--mig-points", 0, "--out", out, "--tensorboard")
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    acc = read_events(out)
    state = checkpoints.load(out / "checkpoint.pt")
    assert steps(acc, "train/loss") == [2, 4, 6]
    # the running means over both ranks, as the training log holds them
    assert values(acc, "train/loss") == pytest.approx([r["loss"] for r in state["log"]], 1e-6)
    assert steps(acc, "eval/test_neg_elbo") == [6]
    assert steps(acc, "images/samples") == [6]
