"""Cross-check our MIG and FactorVAE score against an independent implementation: `disent`.

Issue 13 section 3. `disent` (PyPI, github.com/nmichlo/disent) ports disentanglement_lib's metrics
to PyTorch. It is NOT a dependency of this repository; install it in a throwaway virtualenv:

    python3 -m venv --system-site-packages /work/venv_disent
    /work/venv_disent/bin/pip install disent
    OMP_NUM_THREADS=1 /work/venv_disent/bin/python tests/crosscheck_metrics.py \
        --out runs/metric_crosscheck.json

What is compared, on dSprites-shaped factors (shape, scale, orientation, posX, posY with 3, 6, 40,
32, 32 classes) and synthetic 10-dimensional codes that are fixed functions of the factor grid:
- MIG: `disentanglement.mig` and `disent.metrics._mig._compute_mig` on the SAME (codes, factors)
  arrays (10,000 uniform draws). Same protocol, so they must agree to rounding error.
- FactorVAE: `disentanglement.factor_vae_score` and `disent.metrics.metric_factor_vae`, both
  driven by the same deterministic representation (grid cell -> code). Votes are random and the
  two draw them from different generators, so each is run with several seeds and the means are
  compared against the standard error of their difference.

Code sets (10 latents; "collapsed" latents carry std-0.01 noise, like a VAE's unused latents):
axis-aligned (latent k = factor k), noisy (standardised factors + 1.5 std noise), rotated (a
random 5x5 rotation of them), shared-pair (posX, posY rotated by 45 degrees into two latents),
pure-noise, dead-latents (axis-aligned with the unused latents exactly constant).

One protocol difference, aligned here: disent prunes latents with std >= 0 (its `_prune_dims`
default; disentanglement_lib sets 0.05 through gin, which disent dropped), we prune std < 0.05.
So FactorVAE is compared twice: at 0.05 (disent's `_prune_dims` given threshold=0.05: the
protocol of disentanglement_lib, Locatello et al. 2019) and at 0 (disent as shipped; ours with min_std=0). At 0 an exactly
constant latent gives 0/0 = NaN, np.argmin picks it for every vote, and both score chance (0.2).

For speed, disent sees each "image" as its grid index and gets whole batches in one vectorised
call (`IndexDataset`) instead of fetching and collating 64 items per vote; `check_adapter` shows
that this gives the same result as disent's stock `DisentDataset` for the same seed.
Exits with status 1 if any comparison disagrees.
"""
import argparse
import importlib.metadata
import json
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import disentanglement as dm  # noqa: E402

try:
    from disent.dataset import DisentDataset
    from disent.dataset.data import GroundTruthData
    from disent.metrics import _factor_vae, _mig, utils as disent_utils
    from disent.util.math.random import random_choice_prng
except ImportError:
    sys.exit("disent is not installed: see this file's docstring for the throwaway venv")
DISENT_VERSION = importlib.metadata.version("disent")

NAMES = ("shape", "scale", "orientation", "posX", "posY")
SIZES = (3, 6, 40, 32, 32)
LATENTS = 10


# ----------------------------------------------------------------------------------------------
# Synthetic codes: a fixed code for every cell of the factor grid
# ----------------------------------------------------------------------------------------------
def grid_values():
    """(737280, 5) factor values in [0, 1] (class / (size - 1)), posY varying fastest."""
    classes = np.stack(np.unravel_index(np.arange(np.prod(SIZES)), SIZES), 1)
    return classes / (np.array(SIZES) - 1)


def code_tables(seed=0):
    """name -> (737280, LATENTS) code of each grid cell. The noise is drawn once per cell, so a
    code is a deterministic function of the factors, as a posterior mean is of the image."""
    rng = np.random.default_rng(seed)
    v = grid_values()                                                    # (G, 5)
    noise = rng.standard_normal((len(v), LATENTS))                       # (G, 10)
    collapsed = 0.01 * noise[:, 5:]                                      # std 0.01 < 0.05
    std_v = (v - v.mean(0)) / v.std(0)                                   # unit-variance factors
    rotation = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    x, y = std_v[:, 3], std_v[:, 4]
    pair = std_v.copy()                                                  # posX, posY -> 45 deg
    pair[:, 3], pair[:, 4] = (x + y) / 2**.5, (x - y) / 2**.5
    tables = {
        "axis-aligned": np.hstack([v, collapsed]),
        "noisy": np.hstack([std_v + 1.5 * noise[:, :5], collapsed]),
        "rotated": np.hstack([std_v @ rotation + 0.1 * noise[:, :5], collapsed]),
        "shared-pair": np.hstack([pair + 0.1 * noise[:, :5], collapsed]),
        "pure-noise": noise,
        "dead-latents": np.hstack([v, np.zeros_like(collapsed)]),          # std exactly 0
    }
    return {name: t.astype(np.float32) for name, t in tables.items()}


def lookup(table, classes):
    """Codes (n, D) of the grid cells with the given factor classes (n, 5)."""
    return table[np.ravel_multi_index(classes.T, SIZES)]


# ----------------------------------------------------------------------------------------------
# disent's side: the grid as a ground-truth dataset whose observation is the cell index
# ----------------------------------------------------------------------------------------------
class FactorGrid(GroundTruthData):
    factor_names = NAMES
    factor_sizes = SIZES
    img_shape = (1, 1, 1)

    def __len__(self):
        return int(np.prod(SIZES))

    def _get_observation(self, idx):
        return idx


class IndexDataset(DisentDataset):
    """Stock DisentDataset, but batches come from one vectorised call (observation = index)."""

    def dataset_batch_from_factors(self, factors, mode, collate=True):
        return self.gt_data.pos_to_idx(factors)

    def dataset_sample_batch(self, num_samples, mode, replace=False, return_indices=False,
                             collate=True, seed=None):
        return random_choice_prng(len(self.gt_data), size=num_samples, replace=replace, seed=seed)


def theirs_factor_vae(table, seed, n_train, n_eval, min_std, dataset_cls=IndexDataset):
    """disent's FactorVAE eval and train accuracy; its latent pruning threshold set to min_std."""
    prune = partial(_factor_vae._prune_dims, threshold=min_std)
    np.random.seed(seed)                                                 # disent uses np.random
    with mock.patch.object(_factor_vae, "_prune_dims", prune):
        out = _factor_vae.metric_factor_vae.compute(
            dataset_cls(FactorGrid()), lambda x: table[np.asarray(x)], batch_size=64,
            num_train=n_train, num_eval=n_eval, num_variance_estimate=10_000)
    return float(out["factor_vae.eval_accuracy"]), float(out["factor_vae.train_accuracy"])


def theirs_mig(codes, factors):
    """disent's MIG and its (D, K) mutual-information matrix, from (N, D) codes, (N, K) factors."""
    mi = disent_utils.discrete_mutual_info(disent_utils.histogram_discretize(codes.T), factors.T)
    return float(_mig._compute_mig(codes.T, factors.T)["mig.discrete_score"]), mi


# ----------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------
def ours_factor_vae(table, seed, n_train, n_eval, min_std):
    rng = np.random.default_rng(seed)
    score, train, _ = dm.factor_vae_score(partial(lookup, table), dm.sample_dsprites_factors,
                                           rng, n_train, n_eval, batch=64, n_global=10_000,
                                           min_std=min_std)
    return score, train


def check_adapter(table, seed=0, n_train=300, n_eval=150):
    """IndexDataset must give disent's stock DisentDataset result for the same np.random seed."""
    fast = theirs_factor_vae(table, seed, n_train, n_eval, 0.05)
    stock = theirs_factor_vae(table, seed, n_train, n_eval, 0.05, dataset_cls=DisentDataset)
    return fast == stock


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------
def compare_seeds(ours, theirs):
    """Means, stds over seeds, difference of means and its standard error. They agree if the
    difference is within 4 standard errors (few seeds, a dozen comparisons) or below 0.01."""
    ours, theirs = np.array(ours), np.array(theirs)
    diff = ours.mean() - theirs.mean()
    se = np.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    return {"ours": ours.tolist(), "disent": theirs.tolist(),
            "ours_mean": ours.mean(), "ours_std": ours.std(ddof=1),
            "disent_mean": theirs.mean(), "disent_std": theirs.std(ddof=1),
            "diff": diff, "se_diff": se, "agree": bool(abs(diff) <= max(4 * se, 0.01))}


def crosscheck(table, seeds, n_points, n_train, n_eval):
    rng = np.random.default_rng(1234)
    factors = dm.sample_dsprites_factors(n_points, rng)                 # (N, 5) classes
    codes = lookup(table, factors)                                       # (N, 10) the same codes
    mig_ours, mi_ours = dm.mig(codes, factors)
    mig_theirs, mi_theirs = theirs_mig(codes, factors)
    mi_diff = float(np.abs(mi_ours - mi_theirs).max())
    row = {"mig": {"ours": mig_ours, "disent": mig_theirs, "abs_diff": abs(mig_ours - mig_theirs),
                   "mi_matrix_max_abs_diff": mi_diff,
                   "agree": abs(mig_ours - mig_theirs) < 1e-9 and mi_diff < 1e-9}}
    for label, min_std in (("factor_vae_prune_0.05", 0.05), ("factor_vae_prune_0", 0.0)):
        with np.errstate(invalid="ignore"):            # 0/0 on dead latents when min_std = 0
            ours = [ours_factor_vae(table, s, n_train, n_eval, min_std) for s in seeds]
            theirs = [theirs_factor_vae(table, s, n_train, n_eval, min_std) for s in seeds]
        row[label] = compare_seeds([o[0] for o in ours], [t[0] for t in theirs])
        row[label]["train_accuracy"] = compare_seeds([o[1] for o in ours], [t[1] for t in theirs])
    return row


def print_table(rows):
    print(f"\n{'code set':<14} {'MIG ours':>9} {'MIG disent':>10} {'|diff|':>8}   "
          f"{'FVAE@0.05 ours':>16} {'disent':>16}   {'FVAE@0 ours':>16} {'disent':>16}  agree")
    for name, r in rows.items():
        f5, f0 = r["factor_vae_prune_0.05"], r["factor_vae_prune_0"]
        cell = lambda d, who: f"{d[who + '_mean']:.4f}+-{d[who + '_std']:.4f}"  # noqa: E731
        agree = r["mig"]["agree"] and f5["agree"] and f0["agree"]
        print(f"{name:<14} {r['mig']['ours']:9.5f} {r['mig']['disent']:10.5f} "
              f"{r['mig']['abs_diff']:8.1e}   {cell(f5, 'ours'):>16} {cell(f5, 'disent'):>16}   "
              f"{cell(f0, 'ours'):>16} {cell(f0, 'disent'):>16}  {agree}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/metric_crosscheck.json",
                   help="JSON written here (default runs/metric_crosscheck.json)")
    p.add_argument("--seeds", type=int, default=5, help="FactorVAE seeds per side (default 5)")
    p.add_argument("--points", type=int, default=10_000, help="MIG points (default 10000)")
    p.add_argument("--n-train", type=int, default=2_000,
                   help="FactorVAE training votes (default 2000; the protocol's is 10000)")
    p.add_argument("--n-eval", type=int, default=1_000,
                   help="FactorVAE evaluation votes (default 1000; the protocol's is 5000)")
    return p.parse_args(argv)


def main(args):
    start = time.time()
    tables = code_tables()
    adapter_ok = check_adapter(tables["noisy"])
    print(f"disent {DISENT_VERSION}: the vectorised dataset gives the stock DisentDataset "
          f"result: {adapter_ok}")
    rows = {}
    for name, table in tables.items():
        rows[name] = crosscheck(table, range(args.seeds), args.points, args.n_train,
                                args.n_eval)
        print(f"  {name} done ({time.time() - start:.0f}s)", flush=True)
    print_table(rows)
    ok = adapter_ok and all(r["mig"]["agree"] and r["factor_vae_prune_0.05"]["agree"]
                            and r["factor_vae_prune_0"]["agree"] for r in rows.values())
    result = {"agree": ok, "disent_version": DISENT_VERSION,
              "adapter_matches_stock_dataset": adapter_ok, "code_sets": rows,
              "protocol": {"factors": dict(zip(NAMES, SIZES)), "latents": LATENTS,
                           "mig_points": args.points, "bins": 20, "seeds": args.seeds,
                           "train_votes": args.n_train, "eval_votes": args.n_eval, "batch": 64,
                           "variance_points": 10_000},
              "seconds": time.time() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"{'all agree' if ok else 'DISAGREEMENT'}; wrote {out} ({time.time() - start:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
