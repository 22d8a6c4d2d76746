"""Analyse a trained beta-VAE: attribute vectors, latent traversals, disentanglement metrics.

The model is rebuilt from the checkpoint alone (its stored args); nothing is retyped.

    python beta_vae_analyze.py --checkpoint runs/beta_vae_celeba/checkpoint.pt --attribute Smiling
    python beta_vae_analyze.py --checkpoint runs/beta_vae_dsprites/checkpoint.pt --traverse --metrics
    python beta_vae_analyze.py --curves runs/run_a runs/run_b --out runs/curves

Attribute vector (latent arithmetic, as in White 2016 "Sampling generative networks" and the
"smile vector"): the mean posterior mean of labelled images with the attribute minus that of
images without it; adding alpha times it to an image's code and decoding moves the image along
the attribute.

Disentanglement metrics (MIG, the FactorVAE score) on dSprites: disentanglement.py.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

import beta_vae
import disentanglement
import standard_vae as sv
import trained
import utils
from training import arguments, checkpoints, console, devices, files, progress
from training.distributed import Sums
from training.errors import UserError


# ----------------------------------------------------------------------------------------------
# Attribute vectors
# ----------------------------------------------------------------------------------------------
def label_table(data):
    """The labels as (N, F) with one name per column (MNIST/CIFAR classes become one column)."""
    labels = data.labels if data.labels.dim() == 2 else data.labels[:, None]
    return labels, list(data.label_names)


def parse_label_value(data, name, value):
    names = data.value_names.get(name)
    if names and value in names:
        return names.index(value)
    count = len(names) if names else (
        utils.DSPRITES_SIZES[utils.DSPRITES_FACTORS.index(name)] if data.name == "dsprites"
        else {"celeba": 2, "folder": 2, "mnist": 10, "cifar10": 10}[data.name])
    try:
        number = int(value)
        if not 0 <= number < count:
            raise ValueError
        return number
    except ValueError:
        hint = f"one of {', '.join(names)} or a class number 0 to {count - 1}" if names else \
            f"a class number 0 to {count - 1}"
        raise UserError(f"bad value {value!r} for {name}: {name} takes {hint}") from None


def select(data, spec):
    """Boolean mask (N,) of images matching 'Name=value[,Name=value...]' (all must hold)."""
    labels, names = label_table(data)
    mask = torch.ones(len(labels), dtype=torch.bool)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if name not in names or not sep:
            raise UserError(f"bad condition {part!r}: use Name=value with Name one of "
                            f"{', '.join(names)}")
        mask &= labels[:, names.index(name)] == parse_label_value(data, name, value)
    return mask


def attribute_groups(data, attribute, condition=""):
    """Masks of the images with and without `attribute`, both restricted by `condition`.

    'Smiling' (a binary attribute): 1 versus 0. 'shape=heart', 'digit=3': that value versus the
    rest. 'scale' (an ordered factor, no value): the upper half of its values versus the lower.
    """
    labels, names = label_table(data)
    name, sep, value = attribute.partition("=")
    if name not in names:
        raise UserError(f"unknown attribute {name!r} for {data.name}; valid: "
                        f"{', '.join(names)}")
    column = labels[:, names.index(name)].long()
    if sep:
        positive = column == parse_label_value(data, name, value)
        negative = ~positive
    elif set(column.unique().tolist()) <= {-1, 0, 1} and data.name in utils.ATTRIBUTE_DATASETS:
        # -1: a folder image without a row in its labels file, in neither group
        positive, negative = column == 1, column == 0
    elif data.name == "dsprites" and name != "shape":
        middle = (utils.DSPRITES_SIZES[names.index(name)] - 1) / 2
        positive, negative = column > middle, column < middle
    else:
        raise UserError(f"{name} needs a value, e.g. {name}="
                        f"{(data.value_names.get(name) or [1])[-1]}")
    keep = select(data, condition)
    return positive & keep, negative & keep


@torch.no_grad()
def posterior_means(model, images, device, batch=500, desc="encoding"):
    batches = progress.bar(utils.iterate(images, batch, device), desc=desc, unit="batch",
                           total=math.ceil(len(images) / batch))
    return torch.cat([model.encoder(x)[0].cpu() for x in batches])


def attribute_vector(mu, positive, negative):
    """mean mu(x | attribute) - mean mu(x | no attribute), over the given images."""
    if positive.sum() == 0 or negative.sum() == 0:
        raise UserError(f"need images with and without the attribute; found "
                        f"{int(positive.sum())} with and {int(negative.sum())} without "
                        "(raise --n-images or loosen --condition)")
    return mu[positive].mean(0) - mu[negative].mean(0)


def parse_strengths(text):
    """'start:stop:count' (inclusive, evenly spaced) or a comma list, e.g. '-1,0,0.5,1'."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            strengths = torch.linspace(float(start), float(stop), arguments.positive_int(count))
        else:
            strengths = torch.tensor([float(v) for v in text.split(",")])
        if not strengths.isfinite().all():
            raise ValueError
        return strengths
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"bad --strengths {text!r}: use start:stop:count or a comma "
                        "list") from None


@torch.no_grad()
def apply_vector(model, x, vector, strengths):
    """(B, 1 + len(strengths), C, H, W): the image, then decode(mu(x) + alpha * vector)."""
    mu = model.encoder(x)[0]                                            # (B, D)
    z = mu[:, None] + strengths.to(mu)[None, :, None] * vector.to(mu)   # (B, A, D)
    decoded = model.mean_image(model.decoder(z.flatten(0, 1)))
    return torch.cat([x[:, None], decoded.view(len(x), len(strengths), *x.shape[1:])], 1)


def pick_images(args, train_args, root, data_test, negative_test):
    """The images to edit: named by --images (file names for CelebA, test indices otherwise),
    else the first --n-show test images without the attribute."""
    if not args.images:
        rows = torch.nonzero(negative_test).flatten()[:args.n_show]
        names = [data_test.files[i] if data_test.files else f"test {i}" for i in rows.tolist()]
        return data_test.images[rows], names
    wanted = [w.strip() for w in args.images.split(",") if w.strip()]
    if train_args.dataset != "celeba":
        try:
            rows = [int(w) for w in wanted]
            return data_test.images[rows], [f"test {i}" for i in rows]
        except (ValueError, IndexError):
            within = "the whole test split" if len(data_test) < args.n_images else \
                f"the first --n-images {args.n_images} test images (raise it to reach further)"
            raise UserError(f"--images takes indices 0 to {len(data_test) - 1} into "
                            f"{within} for {train_args.dataset}") from None
    found = {}
    for split in ("test", "valid", "train"):
        data = data_test if split == "test" else utils.load_dataset(
            "celeba", root, split, None, train_args.image_size, train_args.crop)
        index = {f: i for i, f in enumerate(data.files)}
        found.update({w: data.images[index[w]] for w in wanted if w in index and w not in found})
        if len(found) == len(wanted):
            break
    missing = [w for w in wanted if w not in found]
    if missing:
        raise UserError(f"--images not found in CelebA: {', '.join(missing)}")
    return torch.stack([found[w] for w in wanted]), wanted


def pixel_signature(images, positive, negative):
    """The attribute's signature in pixels: mean image with it minus mean image without it."""
    mean = lambda mask: images[mask].sum(0, dtype=torch.float64) / (255 * int(mask.sum()))
    return mean(positive) - mean(negative)


@torch.no_grad()
def attribute_effect(model, images, positive, negative, vector, signature, device,
                     strengths=(1.0,), batch=500):
    """How much of an attribute the model and its vector carry, measured in pixels on held-out
    `images`, against the attribute's `signature` s (`pixel_signature` of the training images,
    so that the chance differences between the held-out groups cannot score as signal).

    reconstructed: <mean recon(x+) - mean recon(x-), s> / <s, s>, the share of the signature
        that the model's reconstructions (decoded posterior means) keep: 1 when they keep the
        whole difference, 0 when the model does not encode the attribute.
    adds: <mean over x- of decode(mu + v) - decode(mu), s> / <s, s>, the share of the signature
        that adding the vector puts into images without the attribute; `adds_by_strength` the
        same with alpha * v for each alpha in `strengths`.
    Sums stay on the device in compensated float32 (distributed.Sums: no float64, which MPS
    lacks) and are read once, in float64 on the host.
    """
    strengths = torch.as_tensor(sorted({1.0, *map(float, strengths)}))
    pixels = images[0].numel()
    sums = {"recon_pos": Sums(pixels, device), "recon_neg": Sums(pixels, device),
            "shift": Sums(len(strengths) * pixels, device)}
    for name, mask in (("pos", positive), ("neg", negative)):
        for x in utils.iterate(images[mask], batch, device):
            mu = model.encoder(x)[0]
            recon = model.mean_image(model.decoder(mu)).float()
            sums[f"recon_{name}"].add(recon.sum(0).flatten())
            if name == "neg":
                z = mu[:, None] + strengths.to(mu)[None, :, None] * vector.to(mu)   # (B, A, D)
                moved = model.mean_image(model.decoder(z.flatten(0, 1))).float()
                moved = moved.view(len(x), len(strengths), *x.shape[1:]) - recon[:, None]
                sums["shift"].add(moved.sum(0).flatten())
    sums = {k: v.read() for k, v in sums.items()}                  # float64 numpy, on the host
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    signature = signature.cpu().numpy().astype(np.float64).ravel()
    norm = np.square(signature).sum()
    share = lambda d: float((d * signature).sum() / norm)
    adds = [share(d) for d in sums["shift"].reshape(len(strengths), -1) / n_neg]
    return {"reconstructed": share(sums["recon_pos"] / n_pos - sums["recon_neg"] / n_neg),
            "adds": adds[strengths.tolist().index(1.0)],
            "adds_by_strength": [[a, v] for a, v in zip(strengths.tolist(), adds)],
            "signature_rms": float(np.sqrt(norm / signature.size)),
            "held_out_with": n_pos, "held_out_without": n_neg}


# A vector is reported as noise when the model keeps less than this share of the signature.
ENCODED = 0.25


def effect_verdict(name, effect):
    """One line: whether the model reconstructs the attribute and what its vector adds."""
    kept, adds = effect["reconstructed"], effect["adds"]
    adds_text = f"; adding the vector puts in {adds:.0%} of it"
    if kept < ENCODED:
        return (f"the model does not reconstruct {name} (its reconstructions keep {kept:.0%} of "
                f"the attribute's pixel signature): the vector is noise{adds_text}")
    return f"the model reconstructs {name} ({kept:.0%} of its pixel signature){adds_text}"


def attribute_analysis(model, train_args, root, args, device, out):
    options = utils.data_options(train_args)
    train = utils.load_dataset(train_args.dataset, root, "train", args.n_images, **options)
    if train.labels is None:
        raise UserError(f"{train_args.dataset} has no labels to take attributes from")
    positive, negative = attribute_groups(train, args.attribute, args.condition)
    mu = posterior_means(model, train.images, device, desc="encoding the labelled images")
    vector = attribute_vector(mu, positive, negative)
    test = utils.load_dataset(train_args.dataset, root, "test", args.n_images, **options)
    positive_test, negative_test = attribute_groups(test, args.attribute, args.condition)
    strengths = parse_strengths(args.strengths)
    effect = None
    if positive_test.any() and negative_test.any():
        effect = attribute_effect(model, test.images, positive_test, negative_test, vector,
                                  pixel_signature(train.images, positive, negative), device,
                                  strengths.tolist())
    images, names = pick_images(args, train_args, root, test, negative_test)
    grid = apply_vector(model, images.to(device).float() / 255, vector.to(device), strengths)
    tag = "".join(c if c.isalnum() or c in "_-" else "-" for c in args.attribute)
    utils.save_labelled_rows(grid, names, out / f"attribute_{tag}.png", gap_every=1)
    record = {"vector": vector, "attribute": args.attribute, "condition": args.condition,
              "strengths": strengths, "n_positive": int(positive.sum()),
              "n_negative": int(negative.sum()), "images": names}
    files.atomic_write(out / f"attribute_{tag}.pt", lambda f: torch.save(record, f))
    verdict = (effect_verdict(args.attribute, effect) if effect else
               "no held-out images with and without it: effect not measured")
    files.write_json(out / f"attribute_{tag}.json", {
        "attribute": args.attribute, "condition": args.condition,
        "train_with": record["n_positive"], "train_without": record["n_negative"],
        "vector_norm": float(vector.norm()), "effect": effect, "verdict": verdict,
        "encoded_threshold": ENCODED, "checkpoint": str(args.checkpoint)})
    print(f"{args.attribute}: vector from {record['n_positive']} images with and "
          f"{record['n_negative']} without (norm {vector.norm():.2f}); "
          f"strengths {[round(a, 3) for a in strengths.tolist()]}; "
          f"wrote {out / f'attribute_{tag}.png'}, .pt and .json")
    print(f"{args.attribute}: {verdict}")
    return {**record, "effect": effect, "verdict": verdict}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def load_model(path, device):
    """Rebuild a beta-VAE (or Standard VAE) from its checkpoint's stored args."""
    state = checkpoints.load(path, map_location=device)
    if state.get("kind") not in ("beta_vae", "standard_vae"):
        checkpoints.check_kind(state, path, "beta_vae")
    model = trained.network(state, path)
    return model.to(device).eval(), argparse.Namespace(**state["args"]), state


def evaluate_held_out(model, train_args, root, device, n=2000):
    """The first `n` test images, at most as many as the run itself scored (its
    --eval-limit), and standard_vae.evaluate on them (KL per dim, active units)."""
    from standard_vae import evaluate
    n = min(n, getattr(train_args, "eval_limit", None) or n)
    test = utils.load_dataset(train_args.dataset, root, "test", n, **utils.data_options(train_args))
    return test, evaluate(model, test.images, device, train_args.seed,
                          getattr(train_args, "binarize", False), test.binary)


# ----------------------------------------------------------------------------------------------
# How many latents carry information (e.g. latent 10 vs latent 32)
# ----------------------------------------------------------------------------------------------
def latent_kl(paths, args, device, out, informative=0.5):
    """latent_kl.png / .json: one column per beta-VAE run; top, each latent's KL over
    training (from the checkpoint's log); bottom, held-out KL per latent, largest first.

    A latent "carries information" when its held-out KL exceeds `informative` nats; active units
    (variance of the posterior mean over images > 0.01, Burda et al. 2016) are reported too.
    """
    runs = []
    for path in paths:
        model, train_args, state = load_model(path, device)
        if state["kind"] != "beta_vae":
            raise UserError(f"--latent-kl needs beta_vae.py checkpoints; {path} is "
                            f"{state['kind']}")
        root = args.data_root or train_args.data_root
        _, held_out = evaluate_held_out(model, train_args, root, device)
        runs.append((path, train_args, state, held_out))
    fig, axes = utils.plot_figure(2, len(runs), panel=(6, 4))
    summary = []
    for col, (path, train_args, state, held_out) in enumerate(runs):
        kl = held_out["kl_per_dim"]
        order = sorted(range(len(kl)), key=lambda d: -kl[d])
        carrying = sum(k > informative for k in kl)
        beta_vae.plot_kl_per_dim(state["log"], None, train_args, informative, ax=axes[0, col])
        axes[0, col].set_title(f"latent {train_args.latent}: KL per latent during training",
                               fontsize="medium")
        utils.plot_bars([kl[d] for d in order], ax=axes[1, col], labels=[f"z{d}" for d in order],
                        xlabel="latent, by held-out KL",
                        title=f"held out: {carrying} of {len(kl)} latents > {informative} nat, "
                              f"{held_out['active_units']} active units")
        summary.append({"checkpoint": str(path), "latent": train_args.latent,
                        "step": state["step"], "kl_per_dim": kl, "latents_by_kl": order,
                        "latents_above_threshold": carrying,
                        "active_units": held_out["active_units"], "kl": held_out["kl"],
                        "recon": held_out["recon"], "neg_elbo": held_out["neg_elbo"],
                        "test_images": held_out["images"]})
    top = max(max(r["kl_per_dim"]) for r in summary)
    for ax in axes[1]:                               # one KL scale for every run
        ax.set_ylim(0, max(top * 1.05, 1e-3))
    utils.save_figure(fig, out / "latent_kl.png")
    files.write_json(out / "latent_kl.json",
                     {"threshold_nats": informative, "runs": summary})
    for r in summary:
        print(f"latent {r['latent']}: {r['latents_above_threshold']} latents > {informative} "
              f"nat, {r['active_units']} active units, KL {r['kl']:.2f}, recon {r['recon']:.2f}")
    print(f"latent_kl.png and latent_kl.json written to {out}")
    return summary


# ----------------------------------------------------------------------------------------------
# Disentanglement during training: MIG against images seen, one line per run
# ----------------------------------------------------------------------------------------------
def recipe(args):
    """A run's recipe in a few words: objective, network, batch, learning rate, seed."""
    arch = getattr(args, "arch", "conv")
    tc = f" {args.tc_estimator}" if args.objective == "TC" else ""
    gamma = f" gamma {args.gamma:g}" if args.objective == "B" else ""
    beta = (f" beta {args.beta:g}" if args.objective != "B" and
            args.beta != beta_vae.BETA.get(args.objective) else "")      # beyond its default
    return (f"{args.objective}{tc}{gamma}{beta}, {arch}, batch {args.batch_size}, lr {args.lr:g}, "
            f"seed {args.seed}")


def run_record(folder):
    """A beta_vae.py run folder's args, history and, once it has finished, its metrics."""
    folder = Path(folder)
    try:
        history = json.loads((folder / "history.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder} has no readable history.json ({e}); --curves takes "
                              "beta_vae.py run folders") from None
    metrics = {}
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text())
        args = metrics["args"]
    else:                                   # a run still training, or stopped: its checkpoint
        state = checkpoints.load(folder / "checkpoint.pt")
        checkpoints.check_kind(state, folder / "checkpoint.pt", "beta_vae")
        args = state["args"]
    return argparse.Namespace(**args), history, metrics


def curve_records(source):
    """The MIG curves of one --curves source: a beta_vae.py run folder (from its history), or a
    mig_curves.json that an earlier --curves wrote (its runs as recorded there: the curves of
    runs whose folders are gone)."""
    source = Path(source)
    if source.suffix == ".json":
        try:
            return json.loads(source.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{source} is not a mig_curves.json that --curves wrote "
                            f"({type(e).__name__}: {e})") from None
    args, history, metrics = run_record(source)
    points = [h for h in history if "mig" in h]
    if not points:
        raise UserError(f"{source}'s history.json holds no MIG: train on dsprites "
                        "with --mig-points > 0")
    per_step = args.batch_size * metrics.get("world_size", 1)
    return [{"run": str(source), "recipe": recipe(args),
             "images_per_s": metrics.get("images_per_s") or points[-1].get("images_per_s"),
             "precision": metrics.get("precision"), "finished": bool(metrics),
             "mig_points": args.mig_points, "images_seen": [h["step"] * per_step for h in points],
             "mig": [h["mig"] for h in points],
             "latent_factors_last": points[-1].get("latent_factors")}]


def setting(record):
    """A curve's recipe without its seed: the seeds of one setting share a colour."""
    return without_seed(record["recipe"])


def without_seed(recipe_text):
    """A `recipe` without its seed: the setting that the seeds of one recipe share."""
    return re.sub(r", seed \d+$", "", recipe_text)


def mig_curves(sources, out):
    """mig_curves.png / .json: the MIG each beta_vae.py run on dSprites scored during training
    (history.json: one point per held-out evaluation, on --mig-points images) against the
    training images seen, one line per run; the seeds of a setting share a colour and one
    legend entry. `sources` are run folders or earlier mig_curves.json files."""
    summary = [r for source in sources for r in curve_records(source)]
    settings = list(dict.fromkeys(setting(r) for r in summary))
    curves, styles = {}, {}
    for r in summary:
        same = [o for o in summary if setting(o) == setting(r)]
        speed = f", {r['images_per_s']:,.0f} img/s" if r.get("images_per_s") else ""
        name = f"{r['recipe']}{speed} ({r['run']})"
        curves[name] = ([n / 1e6 for n in r["images_seen"]], r["mig"])
        styles[name] = {"color": f"C{settings.index(setting(r)) % 10}", "linewidth": 1.2,
                        "label": f"{setting(r)}: {len(same)} seed{'s' * (len(same) > 1)}"
                        if r is same[0] else None}
    utils.plot_curves(curves, out / "mig_curves.png", xlabel="training images seen (millions)",
                      title="MIG during training (dSprites, posterior means; a line a seed)",
                      styles=styles, legend="upper left")
    files.write_json(out / "mig_curves.json", {"runs": summary})
    for r in summary:
        print(f"{r['recipe']}: MIG {r['mig'][-1]:.3f} after {r['images_seen'][-1]:,} images "
              f"(best {max(r['mig']):.3f})")
    print(f"mig_curves.png and mig_curves.json written to {out}")
    return summary


# ----------------------------------------------------------------------------------------------
# Unsupervised model selection: runs of one setting ranked by UDR, no labels needed
# ----------------------------------------------------------------------------------------------
def checkpoint_of(path):
    """A run folder's checkpoint.pt, or the checkpoint file itself."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


@torch.no_grad()
def codes_and_kl(model, images, device, batch=500):
    """Posterior means (n, D) of uint8 `images`, in fp32, and each latent's mean KL (D,)."""
    means, kl = [], 0.0
    for x in utils.iterate(images, batch, device):
        mu, logvar = model.encoder(x)
        means.append(mu.float().cpu())
        kl = kl + sv.gaussian_kl(mu.float(), logvar.float()).sum(0).cpu()
    return torch.cat(means).numpy(), (kl / len(images)).numpy()


def history_of(folder):
    """A run folder's history.json entries, or [] where it has none."""
    try:
        return json.loads((Path(folder) / "history.json").read_text())
    except (OSError, ValueError):
        return []


def udr_ranking(paths, data_root, device, out, n_points=10_000, seed=0):
    """udr.json: the runs ranked by UDR (Duan et al. 2020), computed on one common set of
    `n_points` images (dSprites: drawn uniformly from the whole grid; else the held-out split),
    with each run's MIG beside it where an earlier --metrics run of that checkpoint left one.
    As Duan et al. do, a run is scored against the other seeds of its setting (its recipe but
    the seed); a run alone in its setting, against all the others."""
    runs = []
    for p in paths:
        path = checkpoint_of(p)
        model, args, state = load_model(path, device)
        runs.append((path, model, args, state))
    kinds = {(a.dataset, s["data"]["image_size"], s["data"]["channels"]) for _, _, a, s in runs}
    if len(kinds) > 1:
        raise UserError(f"--udr compares runs on the same data: these differ ({sorted(kinds)})")
    args = runs[0][2]
    root = data_root or args.data_root
    if args.dataset == "dsprites":
        index = np.random.default_rng(seed).choice(disentanglement.DSPRITES_GRID, n_points, replace=False)
        images = utils.dsprites_images(root, torch.from_numpy(np.sort(index)))
    else:
        images = utils.load_dataset(args.dataset, root, "test", n_points,
                                    getattr(args, "image_size", 64),
                                    getattr(args, "crop", 148)).images
    codes, kls = zip(*(codes_and_kl(m, images, device) for _, m, _, _ in runs))
    settings = [without_seed(recipe(a)) for _, _, a, _ in runs]
    scores, pairs, kept = disentanglement.udr(codes, kls, settings=settings)
    table = []
    for (path, _, a, state), score, k, s in zip(runs, scores, kept, settings):
        known = earlier_metrics(path.parent / "disentanglement.json", path, state["step"])
        source = "--metrics" if "mig" in known else None
        if not known:           # else the MIG curve's point at this step, if the run has one
            known = next((h for h in history_of(path.parent) if h.get("step") == state["step"]
                          and "mig" in h), {})
            source = "history.json" if known else None
        table.append({"checkpoint": str(path), "recipe": recipe(a), "step": state["step"],
                      "udr": score, "scored_against": ("its setting's other seeds" if
                                                       settings.count(s) > 1 else "all runs"),
                      "informative_latents": k.tolist(),
                      "mig": known.get("mig"), "factor_vae": known.get("factor_vae"),
                      "mig_from": source})
    order = sorted(range(len(table)), key=lambda i: -table[i]["udr"])
    scored = [r for r in table if r["mig"] is not None]
    rho = (disentanglement.spearman([r["udr"] for r in scored], [r["mig"] for r in scored])
           if len(scored) >= 3 else None)
    files.write_json(out / "udr.json", {
        "images": len(images), "kl_floor_nats": 0.01, "similarity": "spearman",
        "runs": [table[i] for i in order], "pairs": pairs.tolist(),
        "pair_order": [table[i]["checkpoint"] for i in range(len(table))],
        "rank_correlation_with_mig": rho, "runs_with_mig": len(scored)})
    print(f"UDR (Duan et al. 2020) on {len(images):,} images, {len(table)} runs, best first:")
    for rank, i in enumerate(order, 1):
        r = table[i]
        mig = f"MIG {r['mig']:.3f}" if r["mig"] is not None else "MIG unknown"
        print(f"{rank:3d}. UDR {r['udr']:.3f}  {mig}  {len(r['informative_latents'])} "
              f"informative latents  {r['recipe']}  ({r['checkpoint']}; against "
              f"{r['scored_against']})")
    if rho is not None:
        print(f"rank correlation of UDR with MIG over {len(scored)} runs: {rho:.2f}")
    print(f"udr.json written to {out}")
    return table


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="a beta_vae.py checkpoint.pt (needed by every analysis but --curves and "
                        "--udr)")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN",
                   help="beta_vae.py run folders on dsprites (or mig_curves.json files an "
                        "earlier --curves wrote): their MIG during training against images "
                        "seen, the seeds of a setting in one colour -> mig_curves.png / .json "
                        "in --out")
    p.add_argument("--udr", nargs="+", default=None, metavar="RUN",
                   help="rank beta_vae.py runs (folders or checkpoints) of one data set by UDR "
                        "(Duan et al. 2020: agreement of their latents with each other's, no "
                        "labels) on --points common images -> udr.json in --out, with each "
                        "run's MIG beside it where --metrics has scored it")
    p.add_argument("--data-root", default=None,
                   help="where the data are (default: the training run's --data-root)")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's)")
    p.add_argument("--attribute", default=None,
                   help="attribute vector: a CelebA attribute (e.g. Smiling), a class folder or "
                        "--labels column of a folder, a dSprites factor (scale, shape=heart) or "
                        "digit=3 on MNIST -> attribute_<name>.png")
    p.add_argument("--condition", default="",
                   help="restrict both groups, e.g. 'Male=0' for smiling women minus women")
    p.add_argument("--n-images", type=arguments.positive_int, default=5000,
                   help="labelled training images the vector is averaged over")
    p.add_argument("--images", default=None,
                   help="images to edit: CelebA file names (000008.jpg,...) or test indices "
                        "(default: the first --n-show test images without the attribute)")
    p.add_argument("--n-show", type=arguments.positive_int, default=6,
                   help="images to edit when not named")
    p.add_argument("--strengths", default="0:1.5:10",
                   help="alphas: start:stop:count or a comma list; for negatives write --strengths=-1:1.5:11")
    p.add_argument("--traverse", action="store_true",
                   help="draw traversal.png (rows named by the factor they encode with "
                        "--metrics, or from an earlier --metrics run of this checkpoint)")
    p.add_argument("--gif", action="store_true",
                   help="with --traverse: also traversal.gif, one frame per traversal step")
    p.add_argument("--steps", type=arguments.number(int, lambda v: v >= 2, "an integer >= 2"),
                   default=7, help="traversal steps over [-span, span] (PNG columns, GIF frames)")
    p.add_argument("--latent-kl", nargs="*", default=None, metavar="OTHER",
                   help="how many latents carry information: KL per latent during training and "
                        "held out -> latent_kl.png/.json, one column for --checkpoint and one for "
                        "each OTHER beta_vae.py checkpoint (e.g. a --latent 32 run)")
    p.add_argument("--metrics", action="store_true",
                   help="MIG and FactorVAE score on dsprites -> disentanglement.json")
    p.add_argument("--points", type=arguments.number(int, lambda v: v >= 2, "an integer >= 2"),
                   default=10_000,
                   help="points for MIG and the global variances; the common images of --udr")
    p.add_argument("--train-votes", type=arguments.positive_int, default=10_000,
                   help="FactorVAE training votes")
    p.add_argument("--eval-votes", type=arguments.positive_int, default=5_000,
                   help="FactorVAE evaluation votes")
    p.add_argument("--seeds", type=arguments.positive_int, default=3,
                   help="seed images of the traversal")
    p.add_argument("--span", type=arguments.positive_float, default=3.0,
                   help="traverse each latent over +-span")
    p.add_argument("--rows", type=arguments.nonneg_int, default=0,
                   help="traversal rows: the latents with the most KL (0 = every latent)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--seed", type=arguments.nonneg_int, default=0, help="random seed of the metrics")
    p.add_argument("--precision", default="auto", choices=devices.PRECISIONS,
                   help="the networks in bf16 or fp16 autocast or fp32 (sums and metrics are "
                        "fp32); auto: bf16 where the hardware has it (a GPU of compute "
                        "capability 8.0 or higher, a CPU with AMX or AVX-512 BF16), fp16 on an "
                        "older GPU, else fp32")
    return p.parse_args(argv)


def earlier_metrics(path, checkpoint, step):
    """The metrics that an earlier --metrics run wrote to `path` for this checkpoint at this
    step (so --traverse alone can name its rows), else {}."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    same = isinstance(results, dict) and results.get("step") == step and \
        Path(str(results.get("checkpoint"))).resolve() == Path(checkpoint).resolve()
    return results if same else {}


def main(args):
    if args.gif and not args.traverse:
        raise UserError("--gif animates the traversal: pass it with --traverse")
    analyses = args.traverse or args.metrics or args.attribute or args.latent_kl is not None
    if not (analyses or args.curves or args.udr):
        raise UserError("nothing to do: pass --attribute NAME, --traverse, --latent-kl, "
                        "--metrics, --curves and/or --udr")
    if args.curves or args.udr:
        out = files.prepare_out(args.out or ".")
        summary = mig_curves(args.curves, out) if args.curves else None
        if args.udr:
            summary = udr_ranking(args.udr, args.data_root, devices.get_device(args.device),
                                  out, args.points, args.seed)
        if not analyses:
            return summary
    if args.checkpoint is None:
        raise UserError("--checkpoint is needed by --attribute, --traverse, --latent-kl and "
                        "--metrics")
    if args.attribute:
        parse_strengths(args.strengths)           # a bad --strengths is refused before any work
    device = devices.get_device(args.device)
    path = Path(args.checkpoint)
    model, train_args, state = load_model(path, device)
    root = args.data_root or train_args.data_root
    out = files.prepare_out(args.out or path.parent)
    precision, why = devices.choose_precision(args.precision, device)   # the hardware's rule
    print(why)
    with devices.autocast(device, precision):  # every encoder and decoder pass of the analysis
        return analyse(args, model, train_args, state, path, root, out, device,
                       why.split(": ", 1)[1])


def analyse(args, model, train_args, state, path, root, out, device, precision):
    """The analyses the flags ask for, on the loaded model; returns the metrics, if any."""
    results = {}
    if args.attribute:
        attribute_analysis(model, train_args, root, args, device, out)
    if args.metrics:
        results = disentanglement.compute_metrics(model, train_args, root, device, args.seed, args.points,
                                  args.train_votes, args.eval_votes)
        results.update(checkpoint=str(path), step=state["step"], precision=precision)
        files.write_json(out / "disentanglement.json", results)
        print(f"MIG {results['mig']:.3f}, FactorVAE score {results['factor_vae']:.3f} "
              f"-> {out / 'disentanglement.json'}")
    if args.traverse:       # rows named by the factors they encode when the metrics are known
        test, held_out = evaluate_held_out(model, train_args, root, device)
        known = results or earlier_metrics(out / "disentanglement.json", path, state["step"])
        names = {int(z[1:]): label for z, label in known.get("latent_factors", {}).items()}
        order = beta_vae.save_traversal(model, test.images, held_out["kl_per_dim"],
                                        out / "traversal.png", seeds=args.seeds,
                                        steps=args.steps, span=args.span,
                                        rows=args.rows or None, names=names,
                                        gif=out / "traversal.gif" if args.gif else None)
        print(f"traversal.png{' and traversal.gif' if args.gif else ''} written to {out} "
              f"(latents by KL: {order})")
    if args.latent_kl is not None:
        latent_kl([path, *map(Path, args.latent_kl)], args, device, out)
    return results


if __name__ == "__main__":
    console.run_command(main, parse_args)
