"""UDR (Duan et al. 2020): unsupervised model selection, on constructed codes and on real runs."""
import json

import numpy as np
import pytest

import beta_vae as bv
import beta_vae_analyze as ba
import disentanglement as dis
import utils


def constructed_models(n=2000, seed=0):
    """Five models' codes of the same n images: four informative latents and two dead ones each.
    a: the factors themselves; b: a permuted, sign-flipped, monotone copy; c: a noisy copy; d: a
    rotation of them (entangled); e: unrelated noise."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(-1, 1, (n, 4))
    dead = 1e-3 * rng.standard_normal((n, 2))
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    codes = [np.c_[f, dead], np.c_[-f[:, [2, 0, 3, 1]] ** 3, dead[:, ::-1]],
             np.c_[f + 0.05 * rng.standard_normal((n, 4)), dead], np.c_[f @ q, dead],
             np.c_[rng.standard_normal((n, 4)), dead]]
    kl = [np.r_[np.ones(4), 0.001, 0.001]] * 5
    return codes, kl


def test_udr_ranks_agreeing_models_first_and_an_unrelated_one_last():
    codes, kl = constructed_models()
    scores, pairs, kept = dis.udr(codes, kl)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3]] * 5       # the dead latents are dropped
    np.testing.assert_allclose(pairs, pairs.T)
    # a permutation with signs and a monotone map is the same code: the most similar pair
    assert pairs[0, 1] == pytest.approx(pairs[~np.eye(5, dtype=bool)].max())
    assert min(scores[:3]) > scores[3] > scores[4]                # agreeing > entangled > noise
    assert scores[4] < 0.1 and min(scores[:3]) > 0.6
    # Duan et al.'s protocol: a model against the other seeds of its setting; alone, all others
    grouped, same, _ = dis.udr(codes, kl, settings=["x", "x", "y", "y", "z"])
    np.testing.assert_allclose(same, pairs)
    assert grouped[:4] == pytest.approx([pairs[0, 1], pairs[0, 1], pairs[2, 3], pairs[2, 3]])
    assert grouped[4] == pytest.approx(scores[4]) == pytest.approx(np.median(pairs[4, :4]))
    with pytest.raises(utils.UserError, match="at least 2"):
        dis.udr(codes[:1], kl[:1])


def test_udr_pair_similarity_is_one_for_a_permutation_and_lower_when_spread():
    assert dis.pair_similarity(np.eye(3)[[2, 0, 1]]) == pytest.approx(1.0)
    # one latent of i spread evenly over two of j: max^2 / sum is 0.25 / 1 for its row and
    # 0.25 / 0.5 for each of those two columns; the other latent matches one to one (1 and 1)
    spread = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert dis.pair_similarity(spread) == pytest.approx((0.25 + 1 + 0.5 + 0.5 + 1) / 5)
    assert dis.pair_similarity(np.zeros((0, 3))) == 0.0


def test_spearman_matches_a_hand_computation():
    assert dis.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert dis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) against (1,3,2,4): 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert dis.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    m = dis.spearman_matrix(np.c_[[1, 2, 3, 4], [4, 3, 2, 1]], np.c_[[1, 3, 2, 4]])
    np.testing.assert_allclose(m, [[0.8], [0.8]])               # absolute values


def test_udr_ranks_real_runs_and_sets_mig_beside_it(tmp_path):
    """--udr on three tiny dSprites runs: every run ranked, the pair matrix symmetric, each run's
    MIG read from its own --metrics result, and the rank correlation with MIG reported."""
    common = ["--dataset", "dsprites", "--data-root", str(tmp_path / "data"), "--limit", "256",
              "--batch-size", "32", "--eval-limit", "64", "--device", "cpu", "--arch", "mlp",
              "--hidden", "32", "--latent", "4", "--objective", "TC", "--max-steps", "8",
              "--mig-points", "0", "--precision", "fp32"]
    runs = [tmp_path / f"run{s}" for s in range(3)]
    for seed, run in enumerate(runs):
        curve = ["--mig-points", "200"] if seed == 2 else []   # its MIG from its own curve
        bv.main(bv.parse_args([*common, *curve, "--seed", str(seed), "--out", str(run)]))
        if seed < 2:
            ba.main(ba.parse_args(["--checkpoint", str(run / "checkpoint.pt"), "--metrics",
                                   "--points", "200", "--train-votes", "20", "--eval-votes",
                                   "10", "--precision", "fp32"]))
    table = ba.main(ba.parse_args(["--udr", *map(str, runs), "--points", "300", "--out",
                                   str(tmp_path / "udr")]))
    saved = json.loads((tmp_path / "udr" / "udr.json").read_text())
    assert saved["images"] == 300 and len(saved["runs"]) == 3
    scores = [r["udr"] for r in saved["runs"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    pairs = np.array(saved["pairs"])
    np.testing.assert_allclose(pairs, pairs.T)
    for run, r in zip(runs[:2], table):
        assert r["mig"] == json.loads((run / "disentanglement.json").read_text())["mig"]
        assert r["mig_from"] == "--metrics"
    last = json.loads((runs[2] / "history.json").read_text())[-1]
    assert (table[2]["mig"], table[2]["mig_from"]) == (last["mig"], "history.json")
    assert saved["runs_with_mig"] == 3 and -1 <= saved["rank_correlation_with_mig"] <= 1
    assert {r["scored_against"] for r in saved["runs"]} == {"its setting's other seeds"}
