"""Use a trained model: samples, reconstructions, an interpolation, or the latent codes of a
folder, from a checkpoint of standard_vae.py, beta_vae.py or vq_vae.py (its kind is read from
the file; nothing about the model is retyped). trained.py does the same from Python.

    python use_model.py --checkpoint runs/beta_vae_dsprites/checkpoint.pt --samples 1000 \\
        --out runs/use/samples
    python use_model.py --checkpoint CKPT --reconstruct photos/ --out runs/use/reconstruct
    python use_model.py --checkpoint CKPT --interpolate a.png b.png --steps 8 --out runs/use/ab
    python use_model.py --checkpoint CKPT --encode photos/ --out runs/use/codes.npz

Images from disk go through exactly what the run's training did to its own (trained.py,
`preprocess`); unreadable files are skipped and named, and the rest goes on.
"""
import csv
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import trained
import utils
from training import arguments, console, devices, files, progress
from training.errors import UserError

GRID = 64                            # images shown in samples.png and reconstructions.png


def parser():
    p = arguments.ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt of a run of standard_vae.py, beta_vae.py or vq_vae.py "
                        "(a VQ-VAE samples through the prior.pt beside it)")
    use = p.add_mutually_exclusive_group(required=True)
    use.add_argument("--samples", type=arguments.positive_int, metavar="N",
                     help="draw N samples: --out DIR gets DIR/samples/sample_*.png (one PNG "
                          "each, the folder FID tools read), DIR/samples.png (the first 64 "
                          "in a grid) and DIR/samples.json")
    use.add_argument("--reconstruct", nargs="+", metavar="PATH",
                     help="image files or folders: --out DIR gets DIR/reconstructions.png "
                          "(each original beside its reconstruction and its error, the first "
                          "64) and DIR/reconstructions.csv (file, MSE and PSNR of every "
                          "image, pixels in [0, 1]). VAEs decode the posterior mean, the "
                          "VQ-VAE the code grid")
    use.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                     help="two image files: --out DIR gets DIR/interpolation.png (A, the "
                          "--steps decodes, B) and DIR/interpolation.json. VAEs: the --path "
                          "between the posterior means mu(A) and mu(B); VQ-VAE: the straight "
                          "line between the encoder outputs z_e(A) and z_e(B) before "
                          "quantisation, each point quantised, then decoded")
    use.add_argument("--encode", nargs="+", metavar="PATH",
                     help="image files or folders: --out FILE.npz gets `files` (one row per "
                          "readable image, in file order: a folder's images sorted by path) "
                          "and, for the VAEs, `mu` and `logvar` (N, D) of q(z|x); for the "
                          "VQ-VAE, `codes` (N, H, W)")
    p.add_argument("--out", required=True,
                   help="the folder of the outputs (created if absent); with --encode, the "
                        ".npz file")
    p.add_argument("--temperature", type=arguments.positive_float, default=1.0,
                   help="--samples: VAEs draw z ~ N(0, T^2 I), the prior's standard deviation "
                        "scaled by T; the VQ-VAE draws each code from the PixelCNN's softmax "
                        "of logits / T. Below 1: cleaner, less varied samples")
    p.add_argument("--seed", type=arguments.nonneg_int, default=None,
                   help="--samples: random seed (default: the run's --seed, so that "
                        "--samples 64 at temperature 1 redraws the run's samples.png)")
    p.add_argument("--steps", type=arguments.number(int, lambda v: v >= 2, "an integer >= 2"),
                   default=8, help="--interpolate: images on the path, both ends included")
    p.add_argument("--path", default="linear", choices=("linear", "slerp"),
                   help="--interpolate, VAEs: linear, (1-t) mu(A) + t mu(B); or slerp, the "
                        "great circle between them (White 2016), whose points keep a norm "
                        "typical of the N(0, I) prior where the straight line passes nearer "
                        "the origin")
    p.add_argument("--batch-size", type=arguments.positive_int, default=256,
                   help="images per forward pass (a VQ-VAE draws this many code grids at "
                        "once: the same seed gives the same samples for the same batch size)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="device (auto = cuda, then mps, then cpu)")
    p.add_argument("--precision", default="fp32", choices=devices.PRECISIONS,
                   help="the networks in fp32, or in bf16 or fp16 autocast; auto: the "
                        "training scripts' rule (bf16 where the hardware has it). fp32 "
                        "redraws the run's own samples.png exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier use in --out (its sample PNGs are "
                        "deleted first); without it they are refused")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


SAMPLE_ONLY, INTERPOLATE_ONLY = ("temperature", "seed"), ("steps", "path")


def check_args(args):
    """Flags typed for another use are refused rather than ignored."""
    use = next(k for k in ("samples", "reconstruct", "interpolate", "encode")
               if getattr(args, k) is not None)
    stray = [k for k in SAMPLE_ONLY * (use != "samples") + INTERPOLATE_ONLY * (
        use != "interpolate") if k in args.given]
    if stray:
        flags = " and ".join(f"--{k}" for k in stray)
        raise UserError(f"{flags} appl{'ies' if len(stray) == 1 else 'y'} to "
                        f"--{'samples' if stray[0] in SAMPLE_ONLY else 'interpolate'}, not "
                        f"--{use}")
    return use


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def check_out(out, outputs, overwrite, samples=None):
    """--out is a folder (or absent) whose `outputs` (and sample PNGs in `samples`) are absent,
    or --overwrite; else one line."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder for the outputs (it is created "
                        "if absent)")
    there = [p for p in outputs if p.exists()]
    if samples is not None and samples.is_dir():
        there += sorted(samples.glob("sample_*.png"))[:1]
    if there and not overwrite:
        raise UserError(f"{out} already holds the outputs of an earlier use ({there[0]}); "
                        "--overwrite replaces them, or name another --out")


def png_bytes(image):
    """One image (C, S, S) in [0, 1] as PNG bytes, rounded to 8 bits as torchvision's
    save_image rounds (x * 255 + 0.5)."""
    pixels = image.float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)).save(
        buffer, format="png")
    return buffer.getvalue()


def write_file(path, data):
    """Whole or absent: a temporary file renamed over `path` (no fsync: one per sample PNG
    would slow a folder of thousands)."""
    with files.replacing(path, path.suffix) as tmp:
        tmp.write_bytes(data)


def write_samples(model, n, temperature, seed, out, overwrite):
    folder = out / "samples"
    check_out(out, [out / "samples.png", out / "samples.json"], overwrite, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("sample_*.png"):          # --overwrite: no stale sample is left
        old.unlink()
    seed = model.args.get("seed", 0) if seed is None else seed
    width = max(5, len(str(n - 1)))
    shown, i = [], 0
    with progress.bar(total=n, desc="samples", unit="image") as bar:
        for batch in model.samples(n, temperature, model.generator(seed)):
            for image in batch:
                write_file(folder / f"sample_{i:0{width}d}.png", png_bytes(image))
                i += 1
            shown.append(batch[:GRID - sum(map(len, shown))].cpu())
            bar.update(len(batch))
    utils.save_grid(torch.cat(shown), out / "samples.png", nrow=8)
    files.write_json(out / "samples.json", {
        "checkpoint": str(model.path), "kind": model.kind, "samples": n,
        "temperature": temperature, "seed": seed, "precision": model.precision,
        "batch_size": model.batch_size, "folder": str(folder)})
    how = ("z ~ N(0, T^2 I), decoded" if model.kind != "vq_vae" else
           "code grids from the PixelCNN prior at softmax temperature T, decoded")
    print(f"{n:,} samples ({how}; T = {temperature:g}, seed {seed}) in {folder}/, the first "
          f"{min(n, GRID)} in {out / 'samples.png'}")


def read_in_batches(model, paths, desc):
    """(an iterator of `trained.Images` of batch_size files each of the image files of `paths`,
    with a progress bar; the record of all it read, skipped and converted, filled as it goes,
    its notes printed at the end)."""
    found = trained.image_files(paths)
    if not found:
        raise UserError(f"no image files in {' '.join(map(str, paths))}")
    record = trained.Images(None, [])

    def batches():
        with progress.bar(total=len(found), desc=desc, unit="image") as bar:
            for start in range(0, len(found), model.batch_size):
                read = model.read(found[start:start + model.batch_size])
                record.files += read.files
                record.skipped.update(read.skipped)
                record.converted += read.converted
                record.conversion = read.conversion
                bar.update(len(read.files) + len(read.skipped))
                if read.files:
                    yield read
        for line in record.notes():
            print(line)
        if not record.files:
            raise UserError(f"no readable image among the {len(found):,} files of "
                            f"{' '.join(map(str, paths))}")
    return batches(), record


def psnr(mse):
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def write_reconstructions(model, paths, out, overwrite):
    check_out(out, [out / "reconstructions.png", out / "reconstructions.csv"], overwrite)
    batches, record = read_in_batches(model, paths, "reconstructing")
    errors, pairs = [], []
    for read in batches:
        x = model.as_input(read.pixels)
        recon = model.reconstruct(x)
        errors += (recon - x).pow(2).flatten(1).mean(1).tolist()          # MSE per image
        if sum(map(len, pairs)) < GRID:
            pairs.append(torch.stack([x, recon], 1)[:GRID - sum(map(len, pairs))].cpu())
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "mse", "psnr_db"])
    writer.writerows([f, f"{e:.6g}", f"{psnr(e):.3f}"] for f, e in zip(record.files, errors))
    write_file(out / "reconstructions.csv", table.getvalue().encode())
    labels = [f"{Path(f).name[:28]}  MSE {e:.4f}" for f, e in zip(record.files, errors)]
    pairs = torch.cat(pairs)
    utils.save_labelled_rows(pairs, labels[:len(pairs)], out / "reconstructions.png")
    mean = sum(errors) / len(errors)
    print(f"{len(errors):,} images reconstructed: mean MSE {mean:.5f} (PSNR {psnr(mean):.2f} "
          f"dB, pixels in [0, 1]); per image in {out / 'reconstructions.csv'}, the first "
          f"{len(pairs)} beside their originals in {out / 'reconstructions.png'}")


def write_interpolation(model, a, b, steps, path, out, overwrite):
    check_out(out, [out / "interpolation.png", out / "interpolation.json"], overwrite)
    ends = [Path(a), Path(b)]
    for end in ends:
        if not end.is_file():
            raise UserError(f"interpolation endpoint {end} " + (
                "is a folder, not an image file" if end.is_dir() else "does not exist"))
    read = model.read(ends)
    if read.skipped:
        end, why = next(iter(read.skipped.items()))
        raise UserError(f"cannot read the interpolation endpoint {end}: {why}")
    for line in read.notes():
        print(line)
    x = model.as_input(read.pixels)
    strip = model.interpolate(x[0], x[1], steps, path)                  # (K, C, S, S)
    out.mkdir(parents=True, exist_ok=True)
    row = torch.cat([x[:1], strip, x[1:]])[None].cpu()                  # A, the K decodes, B
    space = "mu" if model.kind != "vq_vae" else "z_e"
    utils.save_labelled_rows(row, [f"{path} in {space}"], out / "interpolation.png")
    t = trained.interpolation_weights(steps).tolist()
    files.write_json(out / "interpolation.json", {
        "checkpoint": str(model.path), "kind": model.kind, "a": str(a), "b": str(b),
        "steps": steps, "path": path, "space": model.SPACE, "t": t,
        "strip": f"original A, the {steps} decodes at t, original B"})
    print(f"interpolation of A = {a} and B = {b}: {steps} images on the {path} path (t = 0 "
          f"to 1) between {model.SPACE}; the strip (A, the decodes, B) in "
          f"{out / 'interpolation.png'}")


def write_codes(model, paths, out, overwrite):
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --encode writes one .npz file, e.g. "
                        f"{out / 'codes.npz'}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; --overwrite replaces it, or name another file")
    batches, record = read_in_batches(model, paths, "encoding")
    parts = []
    for read in batches:
        code = model.encode(model.as_input(read.pixels))
        parts.append([c.cpu() for c in code] if isinstance(code, tuple) else [code.cpu()])
    columns = [torch.cat(c).numpy() for c in zip(*parts)]
    if model.kind == "vq_vae":
        codes = columns[0].astype(np.int16 if model.network.quantizer.num_codes <= 2**15
                                  else np.int32)
        arrays, what = {"codes": codes}, f"code grids (N, H, W) = {codes.shape}"
    else:
        arrays = {"mu": columns[0], "logvar": columns[1]}
        what = f"posterior means mu and log-variances logvar (N, D) = {columns[0].shape}"
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out, lambda f: np.savez(f, files=np.array(record.files), kind=model.kind,
                                               **arrays))
    print(f"{len(record.files):,} images encoded into {out}: {what}, with their files")


def main(args):
    use = check_args(args)
    out = Path(args.out)
    model = trained.load(args.checkpoint, args.device, args.precision)
    model.batch_size = args.batch_size
    print(f"{model.kind} of {model.channels}x{model.image_size}x{model.image_size} images, step "
          f"{model.step}, on {model.device}; {model.why}")
    if use == "samples":
        write_samples(model, args.samples, args.temperature, args.seed, out, args.overwrite)
    elif use == "reconstruct":
        write_reconstructions(model, args.reconstruct, out, args.overwrite)
    elif use == "interpolate":
        write_interpolation(model, *args.interpolate, args.steps, args.path, out, args.overwrite)
    else:
        write_codes(model, args.encode, out, args.overwrite)


if __name__ == "__main__":
    console.run_command(main, parse_args)
