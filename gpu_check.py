"""The GPU check: every check that needs a GPU, in one command of under 10 minutes that writes
everything into one folder. Run it first on any machine with a GPU:

    pip install -r requirements.txt pytest && python gpu_check.py --out runs/gpu_check

Each step has its own time limit, cut to what is left of --budget (9.5 minutes), and its own
log (<out>/<step>.log); a failed step does not stop the others. In order:
1. env: the GPU, its compute capability, this wheel's architectures, the precision auto picks;
2. tests: tests/test_gpu.py (the rule on this GPU, training in every precision, no host-device
   sync in a VQ-VAE step, bit-exact --deterministic resume);
3. bench.py on the GPU: each model's images/s in fp32 and in auto's precision;
4. a short run of each script on the GPU: standard_vae.py, beta_vae.py in auto's precision and
   in fp32, vq_vae.py with its prior, beta_vae_analyze.py --metrics (dSprites, rendered
   locally: no download).
Then <out>/summary.json and summary.txt: every step's status and time, images/s of each script
in each precision, and the 30-epoch CelebA training time they imply for the headline command
(python beta_vae.py --latent 10 --epochs 30).

--dry-run runs the same steps on the CPU in tiny sizes: it shows that the check starts, that
every command parses and runs, and that the summary is written (tests/test_gpu.py skips itself
without CUDA).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CELEBA_TRAIN = 162_770              # images in CelebA's official training split
HEADLINE_EPOCHS = 30


@dataclass
class Step:
    name: str
    argv: list                      # after `python`: a script and its flags
    timeout: int                    # seconds


def steps(out, dry_run, data_root):
    """The check's steps, with the runs' outputs under `out`; `dry_run`: on the CPU, tiny."""
    device = ["--device", "cpu" if dry_run else "cuda", "--data-root", str(data_root)]
    tiny = dry_run
    vae = ["--dataset", "dsprites", *device, "--max-steps", 4 if tiny else 1500,
           "--limit", 512 if tiny else 60_000, "--eval-limit", 64 if tiny else 2000]
    beta = ["beta_vae.py", *vae, "--objective", "B", "--batch-size", 64,
            "--mig-points", 0 if tiny else 2000]
    env = ("import json, torch; from training import devices; d = devices.get_device('auto'); "
           "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
           "'device': str(d), 'gpu': torch.cuda.get_device_name() if d.type == 'cuda' else "
           "None, 'capability': torch.cuda.get_device_capability() if d.type == 'cuda' else "
           "None, 'arch_list': torch.cuda.get_arch_list(), 'bf16_in_hardware': "
           "torch.cuda.is_bf16_supported(including_emulation=False) if d.type == 'cuda' else "
           "None, 'auto': devices.choose_precision('auto', d)}, indent=1))")
    runs = out / "runs"
    return [
        Step("env", ["-c", env], 60),
        Step("tests", ["-m", "pytest", "-q", "-rs", "tests/test_gpu.py"], 240),
        Step("bench", ["bench.py", "--device", device[1], "--out", out / "bench.json",
                       *(["--models", "beta_vae", "--images", 128, "--repeats", 1, "--steps", 2,
                          "--warmup", 1, "--profile-ops", 3] if tiny else
                         ["--repeats", 5, "--round-seconds", 0.5])], 200),
        Step("standard_vae", ["standard_vae.py", *vae, "--iw-samples", 2 if tiny else 50,
                              "--iw-images", 16 if tiny else 500,
                              "--out", runs / "standard_vae"], 120),
        Step("beta_vae", [*beta, "--out", runs / "beta_vae"], 120),
        Step("beta_vae_fp32", [*beta, "--precision", "fp32", "--out", runs / "beta_vae_fp32"],
             120),
        Step("vq_vae", ["vq_vae.py", *vae, "--batch-size", 64, "--prior-max-steps",
                        2 if tiny else 300, "--out", runs / "vq_vae",
                        *(["--hidden", 16, "--res-hidden", 8, "--codes", 32, "--prior-channels",
                           16, "--prior-layers", 2] if tiny else [])], 150),
        Step("beta_vae_analyze", ["beta_vae_analyze.py", "--checkpoint",
                                  runs / "beta_vae" / "checkpoint.pt", "--metrics",
                                  "--points", 200 if tiny else 10_000,
                                  "--train-votes", 20 if tiny else 2000,
                                  "--eval-votes", 10 if tiny else 1000,
                                  "--device", device[1]], 120),
    ]


def run_step(step, out, limit):
    """Run one step in the repository for at most `limit` seconds, its output in
    <out>/<name>.log; (status, seconds)."""
    log = out / f"{step.name}.log"
    argv = [sys.executable, *map(str, step.argv)]
    t = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return status, time.perf_counter() - t


def summarise(out, results):
    """summary.json and summary.txt: the steps, the runs' images/s, bench.py's rows and the
    headline's implied time."""
    summary = {"steps": results, "runs": {}, "bench": {}}
    for metrics in sorted((out / "runs").glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        summary["runs"][metrics.parent.name] = {
            "images_per_s": m.get("images_per_s"), "precision": m.get("precision"),
            "steps": m.get("steps"), "device": m.get("device")}
    bench = out / "bench.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        for name, r in b["models"].items():
            summary["bench"][name] = {
                "auto": r["auto"], "auto_line": r["auto_line"],
                **{f"ours_{p}_images_per_s": row["ours"]["images_per_s"]
                   for p, row in r["rows"].items()}}
        beta = b["models"].get("beta_vae")
        if beta is not None:
            speed = beta["rows"][beta["auto"]]["ours"]["images_per_s"]
            summary["headline_30_epochs_min"] = CELEBA_TRAIN * HEADLINE_EPOCHS / speed / 60
    lines = [f"{s['step']:18s} {s['status']:28s} {s['seconds']:7.1f} s" for s in results]
    lines += [f"run {k}: {v['images_per_s']:.0f} images/s ({(v['precision'] or {}).get('why')})"
              for k, v in summary["runs"].items() if v["images_per_s"]]
    lines += [f"bench {k}, images/s: " + ", ".join(
        f"{p.split('_')[1]} {v:.0f}" for p, v in r.items() if p.startswith("ours_"))
        + f" (auto: {r['auto']})" for k, r in summary["bench"].items()]
    if "headline_30_epochs_min" in summary:
        lines.append(f"headline (beta_vae.py --latent 10 --epochs 30 on CelebA's "
                     f"{CELEBA_TRAIN:,} training images): about "
                     f"{summary['headline_30_epochs_min']:.0f} min of training at bench's "
                     "speed")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


def main(args):
    out = Path(args.out or ("runs/gpu_check_dry_run" if args.dry_run else "runs/gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    plan = [s for s in steps(out.resolve(), args.dry_run, Path(args.data_root).resolve())
            if not args.only or s.name in args.only]
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("gpu_check: PyTorch sees no CUDA GPU here; --dry-run runs the steps on "
                     "the CPU")
    results, t0 = [], time.perf_counter()
    for step in plan:
        limit = min(step.timeout, args.budget - (time.perf_counter() - t0))
        if limit < 10:
            results.append({"step": step.name, "status": "skipped: out of time", "seconds": 0})
            continue
        print(f"gpu_check: {step.name} (limit {limit:.0f} s) ...", flush=True)
        status, seconds = run_step(step, out, limit)
        results.append({"step": step.name, "status": status, "seconds": seconds})
        print(f"gpu_check: {step.name}: {status} in {seconds:.0f} s", flush=True)
    lines = summarise(out, results)
    print("\n".join(lines))
    print(f"gpu_check: {time.perf_counter() - t0:.0f} s in all; outputs in {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None,
                   help="the folder of every output (default: runs/gpu_check, or "
                        "runs/gpu_check_dry_run with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on the CPU in tiny sizes: proves the check starts")
    p.add_argument("--data-root", default="data", help="where dSprites is rendered and kept")
    p.add_argument("--budget", type=float, default=570,
                   help="seconds for all the steps together; a step gets what is left")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these steps (env, tests, standard_vae, beta_vae, "
                        "beta_vae_fp32, vq_vae, beta_vae_analyze, bench)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
