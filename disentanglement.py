"""Disentanglement metrics on dSprites, from their definitions, following the protocol of
disentanglement_lib (Locatello et al. 2019, "Challenging Common Assumptions in the Unsupervised
Learning of Disentangled Representations"): the representation is the posterior mean, the
factors are shape, scale, orientation, posX and posY (colour has a single value).

- MIG (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs", eq. 6): each latent
  discretised into 20 equal-width bins; plug-in mutual information with each factor; the gap
  between the two most informative latents, divided by the factor's entropy, averaged over
  factors.
- FactorVAE score (Kim & Mnih 2018, "Disentangling by Factorising", section 4): latents scaled
  by their std (those with std < 0.05 dropped); each vote fixes one factor for 64 images and
  names the latent of least normalised variance; a majority-vote classifier trained on 10,000
  votes is scored on 5,000 more.

- UDR (Duan et al. 2020, "Unsupervised model selection for variational disentangled
  representation learning"): no labels; models of one setting and different seeds are ranked by
  how well their informative latents match one another's up to permutation and sign.

The settings are gathered, with their sources, in docs/papers.md. beta_vae.py scores MIG during
training (`mig_only`); beta_vae_analyze.py --metrics scores both (`compute_metrics`).
"""

import numpy as np
import torch

import utils
from training import devices, progress
from training.errors import UserError

# dSprites factors scored by the protocol (colour has a single value and is left out)
DSPRITES_SCORED = (1, 2, 3, 4, 5)
DSPRITES_GRID = utils.DSPRITES_STRIDES[0]          # 737,280 images


def discretize(codes, bins=20):
    """Each column into `bins` equal-width bins over its range (histogram edges). (N, D) int."""
    out = np.empty(codes.shape, np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], bins)[1]
        out[:, j] = np.digitize(codes[:, j], edges[:-1])
    return out


def mutual_information(a, b):
    """Plug-in estimate of I(a; b) in nats for two discrete label vectors."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def mig(codes, factors, bins=20):
    """Mutual Information Gap (Chen et al. 2018, eq. 6) of codes (N, D) for factors (N, K).

    Returns the score and the (D, K) mutual-information matrix."""
    z = discretize(codes, bins)
    mi = np.array([[mutual_information(z[:, j], factors[:, k]) for k in range(factors.shape[1])]
                   for j in range(z.shape[1])])                          # (D, K)
    entropy = np.array([mutual_information(f, f) for f in factors.T])   # H(v_k) = I(v_k; v_k)
    top2 = np.sort(mi, axis=0)[::-1][:2] if mi.shape[0] > 1 else np.vstack([mi, 0 * mi])
    return float(np.mean((top2[0] - top2[1]) / entropy)), mi


def latent_factors(mi, entropy, names, floor=0.1):
    """What each latent encodes, from the (D, K) mutual information: the factor with the largest
    share of its entropy captured (MI / H), joined by the next one when that share is at least
    half as large (a mixed latent reads 'posX+posY'); empty below `floor`."""
    share = mi / entropy[None, :]
    labels = []
    for row in share:
        top = np.argsort(row)[::-1]
        if row[top[0]] < floor:
            labels.append("")
            continue
        label = names[top[0]]
        if len(top) > 1 and row[top[1]] >= 0.5 * row[top[0]]:
            label += "+" + names[top[1]]
        labels.append(label)
    return labels


def factor_vae_score(represent, sample_factors, rng, n_train=10_000, n_eval=5_000,
                     batch=64, n_global=10_000, min_std=0.05):
    """FactorVAE metric (Kim & Mnih 2018, section 4).

    `sample_factors(n, rng)` draws (n, K) factor classes of the scored factors;
    `represent(factors)` returns the (n, D) representations of images with those factors.
    Returns the evaluation accuracy, the training accuracy and the kept latents.
    """
    global_var = np.var(represent(sample_factors(n_global, rng)), axis=0, ddof=1)
    active = np.sqrt(global_var) >= min_std
    if not active.any():
        return 0.0, 0.0, active

    def votes(n):
        """(n, 2) pairs (fixed factor, latent of least normalised variance), and K."""
        fixed, groups = [], []
        for _ in range(n):
            f = sample_factors(batch, rng)                                # (batch, K)
            k = rng.integers(f.shape[1])
            f[:, k] = f[0, k]
            fixed.append(k)
            groups.append(f)
        reps = represent(np.concatenate(groups)).reshape(n, batch, -1)    # (n, batch, D)
        local_var = np.var(reps, axis=1, ddof=1)[:, active] / global_var[active]
        return np.stack([np.array(fixed), local_var.argmin(1)], 1), groups[0].shape[1]

    train, n_factors = votes(n_train)
    counts = np.zeros((int(active.sum()), n_factors), np.int64)           # (latent, factor)
    np.add.at(counts, (train[:, 1], train[:, 0]), 1)
    classifier = counts.argmax(1)                                         # latent -> factor
    train_acc = counts.max(1).sum() / n_train
    test, _ = votes(n_eval)
    eval_acc = float(np.mean(classifier[test[:, 1]] == test[:, 0]))
    return eval_acc, float(train_acc), active


# ----------------------------------------------------------------------------------------------
# dSprites: the images a draw of factors names, encoded once each
# ----------------------------------------------------------------------------------------------
def dsprites_encoder(model, root, device, chunk=4096):
    """represent(classes of the scored factors) -> posterior means (n, D), as numpy. The
    encoder runs in fp32 always, as disentanglement_lib scores fp32 posterior means.

    The posterior mean is a deterministic function of the image, so each distinct image is
    encoded once and looked up when it is drawn again: the protocol's ~985,000 draws touch about
    540,000 of the 737,280 images. `represent.encoded` counts the images encoded so far.
    """
    table, done = None, np.zeros(DSPRITES_GRID, bool)

    @torch.no_grad()
    def represent(factors):
        nonlocal table
        classes = np.zeros((len(factors), 6), np.int64)
        classes[:, list(DSPRITES_SCORED)] = factors
        index = classes @ np.array(utils.DSPRITES_STRIDES)
        todo = np.unique(index[~done[index]])
        bar = progress.bar(total=len(todo), desc=f"encoding dSprites for {represent.phase}",
                           unit="image", announce=True) if len(todo) > chunk else None
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            x = utils.dsprites_images(root, torch.from_numpy(part))
            with devices.autocast_off(device):   # fp32 even in the analysis's autocast
                mu = model.encoder(x.to(device).float() / 255)[0].float().cpu().numpy()
            if table is None:
                table = np.zeros((DSPRITES_GRID, mu.shape[1]), np.float32)
            table[part] = mu
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        done[todo] = True
        represent.encoded += len(todo)
        return table[index]

    represent.encoded, represent.phase = 0, "the metrics"
    return represent


def sample_dsprites_factors(n, rng):
    """Uniform, independent draws of the scored factors' classes (n, 5)."""
    sizes = [utils.DSPRITES_SIZES[i] for i in DSPRITES_SCORED]
    return np.stack([rng.integers(s, size=n) for s in sizes], 1)


def mig_only(model, data_root, device, seed, n_points=10_000):
    """MIG alone, on `n_points` images drawn as the protocol draws them: a cheap point of a
    curve during training (beta_vae.py on dSprites). Returns the score and each latent's
    factor."""
    factors = sample_dsprites_factors(n_points, np.random.default_rng(seed))
    was_training = model.training
    model.eval()
    score, mi = mig(dsprites_encoder(model, data_root, device, n_points)(factors), factors)
    model.train(was_training)
    names = [utils.DSPRITES_FACTORS[i] for i in DSPRITES_SCORED]
    entropy = np.array([mutual_information(f, f) for f in factors.T])
    return {"mig": score, "latent_factors": latent_factors(mi, entropy, names)}


def compute_metrics(model, args, data_root, device, seed, n_points=10_000, n_train=10_000,
                    n_eval=5_000):
    if args.dataset != "dsprites":
        raise UserError(f"--metrics needs a model trained on dsprites (the ground-truth "
                        f"factors); this one was trained on {args.dataset}")
    rng = np.random.default_rng(seed)
    represent = dsprites_encoder(model, data_root, device)
    print(f"disentanglement metrics: MIG on {n_points:,} images, FactorVAE on {n_points:,} "
          f"images and {n_train:,} + {n_eval:,} votes of 64 images (each distinct image is "
          "encoded once: about 540,000 of the 737,280 at the default sizes)")
    factors = sample_dsprites_factors(n_points, rng)
    represent.phase = "MIG"
    score, mi = mig(represent(factors), factors)
    represent.phase = "the FactorVAE score"
    fvae, fvae_train, active = factor_vae_score(represent, sample_dsprites_factors, rng,
                                                n_train, n_eval, n_global=n_points)
    names = [utils.DSPRITES_FACTORS[i] for i in DSPRITES_SCORED]
    entropy = np.array([mutual_information(f, f) for f in factors.T])
    return {"mig": score, "factor_vae": fvae, "factor_vae_train_accuracy": fvae_train,
            "latent_factors": {f"z{j}": label for j, label in
                               enumerate(latent_factors(mi, entropy, names))},
            "factor_entropy": dict(zip(names, entropy.tolist())),
            "active_latents": np.flatnonzero(active).tolist(),
            "mutual_information": {f"z{j}": dict(zip(names, row)) for j, row in
                                   enumerate(mi.tolist())},
            "protocol": {"points": n_points, "bins": 20, "train_votes": n_train,
                         "eval_votes": n_eval, "batch": 64, "min_std": 0.05,
                         "factors": names, "representation": "posterior mean", "seed": seed,
                         "images_encoded": represent.encoded}}


# ----------------------------------------------------------------------------------------------
# Unsupervised model selection: UDR (Duan et al. 2020, "Unsupervised model selection for
# variational disentangled representation learning"). Models trained with the same settings and
# different seeds that disentangle agree with each other up to a permutation and sign of their
# latents; entangled ones each entangle differently. No labels are needed.
# ----------------------------------------------------------------------------------------------
def _centred_ranks(x):
    """Each column of `x` (n, D) replaced by its ranks, centred, of unit norm (0 if constant)."""
    r = np.argsort(np.argsort(x, 0, kind="stable"), 0).astype(np.float64)
    r -= r.mean(0)
    norm = np.linalg.norm(r, axis=0)
    return r / np.where(norm > 0, norm, 1.0)


def spearman_matrix(a, b):
    """|Spearman rank correlation| of every column of `a` (n, Da) with every column of `b`
    (n, Db): the Pearson correlation of their ranks. Returns (Da, Db)."""
    return np.abs(_centred_ranks(a).T @ _centred_ranks(b))


def spearman(a, b):
    """Spearman rank correlation of two sequences: the Pearson correlation of their ranks."""
    return float(_centred_ranks(np.c_[a])[:, 0] @ _centred_ranks(np.c_[b])[:, 0])


def pair_similarity(r):
    """UDR_ij of Duan et al. for R (i's informative latents x j's), |correlations|:

        UDR_ij = 1/(d_i + d_j) [sum_b max_a R_ab^2 / sum_a R_ab + sum_a max_b R_ab^2 / sum_b R_ab]

    1 when R is a permutation matrix (each latent of one model is one latent of the other), and
    lower the more a latent spreads over several of the other model's."""
    if r.size == 0:
        return 0.0

    def strength(m):                      # per column: max^2 / sum, 0 for an all-zero column
        total = m.sum(0)
        return np.divide(m.max(0) ** 2, total, out=np.zeros(m.shape[1]), where=total > 0)
    return float((strength(r).sum() + strength(r.T).sum()) / sum(r.shape))


def udr(codes, kl_per_latent, kl_floor=0.01, settings=None):
    """UDR scores of M models from their posterior means `codes` (M arrays (n, D_m), the same n
    images in the same order) and each latent's mean KL (M arrays (D_m,)). A latent is
    informative above `kl_floor` nats (Duan et al.); only informative latents are compared.

    Duan et al. score a model against the other seeds of its own hyperparameter setting:
    with `settings` (a label per model), a model's score is the median of its similarity to
    the other models of its setting, and a model alone in its setting is scored against all
    the others; without it, against all the others.

    Returns (scores, pairs, kept): the scores (higher is better); pairs (M, M), the
    similarities; kept, each model's informative latents."""
    kept = [np.flatnonzero(np.asarray(k) > kl_floor) for k in kl_per_latent]
    m = len(codes)
    if m < 2:
        raise UserError("UDR compares models with each other: give at least 2")
    pairs = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            r = spearman_matrix(codes[i][:, kept[i]], codes[j][:, kept[j]])
            pairs[i, j] = pairs[j, i] = pair_similarity(r)
    settings = list(settings) if settings is not None else [None] * m
    scores = []
    for i in range(m):
        peers = [j for j in range(m) if j != i and settings[j] == settings[i]]
        scores.append(float(np.median(pairs[i, peers or [j for j in range(m) if j != i]])))
    return scores, pairs, kept
