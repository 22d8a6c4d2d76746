import contextlib
import importlib
import io
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from faces import ATTRIBUTES  # noqa: E402  (the repository's root is now on the path)
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread, here and in the scripts the tests start: the tensors of the tiny configurations
# gain nothing from more, and on a 2-core machine a second busy thread pool (another test
# process, a training run) slows both many times over.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def run_script(script, *args, cwd=None, check=True, timeout=300, env=None):
    """Run one of the repository's scripts in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def script():
    return run_script


def run_cli(script, *args, check=True):
    """What `python script args...` does, in this process: console.run_command(main, parse_args)
    with stdout and stderr captured and the exit status kept. For tests of what a command
    does and says; where the process itself matters (signals, exit by the interpreter,
    torchrun, --compile) use run_script."""
    from training import console
    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)      # run_command installs its own
    argv, sys.argv = sys.argv, [script, *map(str, args)]     # argparse names the script
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                console.run_command(module.main, lambda: module.parse_args(list(map(str, args))))
                status = 0
            except SystemExit as e:                 # as the interpreter ends a command
                status = e.code if isinstance(e.code, int) else 1
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        sys.argv = argv
    proc = subprocess.CompletedProcess([script, *map(str, args)], status, out.getvalue(),
                                       err.getvalue())
    if check and status != 0:
        raise AssertionError(f"{script} failed ({status}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


def first_phase(main, args):
    """Run a script's `main(args)` and return what its first phase trained: (model, settings,
    loop.Trained) of its first loop.train call. For torchrun workers, which then read their
    rank's own weights: the process group is left up (the worker tears it down)."""
    from training import distributed, loop
    train, cleanup, phases = loop.train, distributed.cleanup, []

    def keeping(model, opt, step_fn, batches, settings, *rest, **named):
        phases.append((model, settings, train(model, opt, step_fn, batches, settings, *rest,
                                              **named)))
        return phases[-1][2]

    loop.train, distributed.cleanup = keeping, lambda: None
    try:
        main(args)
    finally:
        loop.train, distributed.cleanup = train, cleanup
    return phases[0]


@pytest.fixture
def loss_dtypes(monkeypatch):
    """A list that every call of beta_vae's loss appends to: (the decoder output's dtype,
    {term: dtype} of the tensors it returns)."""
    import beta_vae
    seen, loss = [], beta_vae.beta_vae_loss

    def recording(x, logits, mu, logvar, *settings, **named):
        terms = loss(x, logits, mu, logvar, *settings, **named)
        seen.append((logits.dtype, {k: v.dtype for k, v in terms.items() if torch.is_tensor(v)}))
        return terms
    monkeypatch.setattr(beta_vae, "beta_vae_loss", recording)
    return seen


# ---- the two tiers ----------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--max-test-seconds", type=float, default=None,
                     help="fail the session if any test (setup + call + teardown) takes longer")


TEST_SECONDS = {}             # test id -> setup + call + teardown seconds


def pytest_runtest_logreport(report):
    TEST_SECONDS[report.nodeid] = TEST_SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    limit = config.getoption("--max-test-seconds")
    over = sorted(((s, n) for n, s in TEST_SECONDS.items() if limit and s > limit),
                  reverse=True)
    if over:
        terminalreporter.section(f"tests over --max-test-seconds {limit:g}", red=True)
        for s, n in over:
            terminalreporter.write_line(f"{s:7.1f} s  {n}")


def pytest_sessionfinish(session, exitstatus):
    limit = session.config.getoption("--max-test-seconds")
    if limit and any(s > limit for s in TEST_SECONDS.values()) and session.exitstatus == 0:
        session.exitstatus = 1


def torchrun(*args, timeout=300):
    """Run `args` under torchrun with two CPU processes (one thread each)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def collapsed_quantizer(codebook, restart):
    """A VQ-VAE quantiser of 16 codes: code 0 at the origin, where the data are, the other 15
    far away and unused."""
    import vq_vae as vq
    q = vq.VectorQuantizer(16, 4, codebook, decay=0.99, restart=restart, restart_threshold=1.0)
    with torch.no_grad():
        q.codebook.copy_(torch.full((16, 4), 100.0))
        q.codebook[0] = 0
        q.ema_count.copy_(torch.full((16,), 0.5))
        q.ema_count[0] = 1000.0
        if codebook == "ema":
            q.ema_sum.copy_(q.codebook * q.ema_count[:, None])
    return q


# ---- fixtures in the datasets' real on-disk formats ------------------------------------------
def write_idx(path, array):
    """IDX format: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


N = 36
PARTITION = [0] * 24 + [1] * 6 + [2] * 6


def face_colour(i):
    return (40 + 5 * i, 200 - 4 * i, 90)


def write_celeba(root, layout="official", n=N):
    """A few dozen 178x218 JPEGs: red outside the 148x148 centre crop, a colour of their own
    inside it; plus attribute and partition files in the exact real formats."""
    if layout == "official":
        folder, images = root / "celeba", root / "celeba" / "img_align_celeba"
    else:
        folder, images = root / "celeba", root / "celeba" / "img_align_celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    attrs = rng.choice([-1, 1], size=(n, 40))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(files):
        img = np.zeros((218, 178, 3), np.uint8)
        img[...] = (255, 0, 0)
        top, left = (218 - 148) // 2, (178 - 148) // 2
        img[top:top + 148, left:left + 148] = face_colour(i)
        Image.fromarray(img).save(images / name, quality=95)
    if layout == "official":
        lines = [str(n), " ".join(ATTRIBUTES) + " "]
        # the real file pads values to width 2 with spaces: "-1  1 -1 ..."
        lines += [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, attrs)]
        (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (folder / "list_eval_partition.txt").write_text(
            "".join(f"{f} {p}\n" for f, p in zip(files, PARTITION)))
    else:
        lines = ["image_id," + ",".join(ATTRIBUTES)]
        lines += [f + "," + ",".join(str(v) for v in row) for f, row in zip(files, attrs)]
        (folder / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        (folder / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{f},{p}\n" for f, p in zip(files, PARTITION)))
    return files, (attrs > 0).astype(np.int8)
