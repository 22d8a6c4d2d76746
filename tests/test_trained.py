"""Using a trained model (trained.py, use_model.py): the API and the command on a tiny checkpoint
of each of the three models, against what the training scripts themselves wrote and computed,
and every bad input as one line."""
import csv
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import image_folders
import trained
import utils
import vq_vae as vq
from conftest import ROOT, run_cli
from training.errors import CheckpointError, UserError

COMMON = ["--limit", 64, "--batch-size", 32, "--eval-limit", 32, "--max-steps", 2,
          "--log-every", 1, "--device", "cpu", "--precision", "fp32"]
RUNS = {
    # dSprites, 1 channel, 64 px
    "standard_vae": ["--width", 8, "--hidden", 32, "--latent", 4, "--iw-samples", 0],
    # a folder of colour images, 3 channels, 32 px
    "beta_vae": ["--dataset", "folder", "--image-size", 32, "--latent", 4, "--hidden", 32,
                 "--objective", "H"],
    # dSprites, with a class-conditional PixelCNN prior
    "vq_vae": ["--hidden", 16, "--res-hidden", 8, "--res-layers", 1, "--codes", 16,
               "--latent", 4, "--prior-channels", 8, "--prior-layers", 2, "--prior-kernel", 3,
               "--prior-batch-size", 32, "--prior-conditional"],
}


def colour_image(path, seed, size=(40, 52)):
    """A colour image of random blocks (its channels differ), any size."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).save(path)
    return path


def grey_image(path, seed, size=(36, 36)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L").save(path)
    return path


class Runs(dict):
    """{kind: its run folder}, each script trained for two steps when first asked for (so that
    no one test carries the training of all three)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, kind):
        if kind == "beta_vae":
            folder = self.root / "colour"
            for i in range(40):
                colour_image(folder / f"{i:02d}.png", i)
            data = ["--data-root", folder, "--cache-dir", self.root / "cache"]
        else:
            data = ["--data-root", self.root / "data"]
        run_cli(f"{kind}.py", *COMMON, *data, *RUNS[kind], "--out", self.root / kind)
        self[kind] = self.root / kind
        return self[kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of photos: colour and grey files in a subfolder and at the top, one unreadable
    file among them, and a hidden file that is no image of the folder."""
    root = tmp_path_factory.mktemp("photos")
    colour_image(root / "b.png", 1)
    grey_image(root / "a_grey.png", 2)
    colour_image(root / "sub" / "c.jpg", 3, size=(64, 40))
    (root / "broken.png").write_bytes(b"\x89PNG but truncated")
    colour_image(root / "z.png", 4)
    colour_image(root / ".hidden.png", 5)
    return root


READABLE = ["a_grey.png", "b.png", "sub/c.jpg", "z.png"]       # sorted by path, broken left out


def pixels_of(path):
    return np.asarray(Image.open(path))


def command(*args, check=True):
    return run_cli("use_model.py", *args, check=check)


# ---- the API reproduces what the training scripts computed -----------------------------------
@pytest.mark.parametrize("kind", RUNS)
def test_sample_redraws_the_runs_samples_png(runs, kind, tmp_path):
    model = trained.load(runs[kind] / "checkpoint.pt")
    assert model.kind == kind and not model.network.training
    drawn = model.sample(64)                                            # the run's seed, T = 1
    utils.save_grid(drawn, tmp_path / "api.png", nrow=8)
    assert np.array_equal(pixels_of(tmp_path / "api.png"), pixels_of(runs[kind] / "samples.png"))
    # the command too, with its one PNG per sample; another seed draws other images
    command("--checkpoint", runs[kind] / "checkpoint.pt", "--samples", 64, "--out", tmp_path / "c")
    assert np.array_equal(pixels_of(tmp_path / "c" / "samples.png"),
                          pixels_of(runs[kind] / "samples.png"))
    pngs = sorted((tmp_path / "c" / "samples").iterdir())
    assert len(pngs) == 64 and pngs[0].name == "sample_00000.png"
    expected = drawn[-1].mul(255).add(0.5).clamp(0, 255).byte().numpy()   # 8-bit, rounded
    assert np.array_equal(pixels_of(pngs[-1]).reshape(expected.shape[1:] + (-1,)),
                          expected.transpose(1, 2, 0))
    if kind != "vq_vae":           # (its prior draws position by position: seconds on a CPU)
        assert not torch.equal(model.sample(4, seed=123), drawn[:4])


@pytest.mark.parametrize("kind", RUNS)
def test_reconstruct_equals_the_models_own_forward_pass(runs, kind, images):
    model = trained.load(runs[kind] / "checkpoint.pt")
    x = model.preprocess(images)
    assert x.shape == (4, model.channels, model.image_size, model.image_size)
    net = model.network
    with torch.no_grad():
        if kind == "vq_vae":
            recon, codes, _ = net(x)
            expected = vq.image(recon)
            assert torch.equal(model.encode(x), codes)
        else:
            logits, mu, _ = net(x, eps=torch.zeros(len(x), net.latent))    # z = mu
            expected = net.mean_image(logits)
            assert torch.equal(model.encode(x)[0], mu)
    torch.testing.assert_close(model.reconstruct(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", RUNS)
def test_interpolation_ends_are_the_decodes_of_the_ends_codes(runs, kind, images, tmp_path):
    model = trained.load(runs[kind] / "checkpoint.pt")
    x = model.preprocess([images / "b.png", images / "z.png"])
    strip = model.interpolate(x[0], x[1], steps=5)
    assert strip.shape == (5, *x.shape[1:])
    codes = model.encode(x)
    ends = model.decode(codes if kind == "vq_vae" else codes[0])
    torch.testing.assert_close(strip[[0, -1]], ends, rtol=1e-5, atol=1e-6)
    assert not torch.equal(strip[0], strip[-1])
    proc = command("--checkpoint", runs[kind] / "checkpoint.pt", "--interpolate",
                   images / "b.png", images / "z.png", "--steps", 5, "--out", tmp_path)
    said = "z_e(A) and z_e(B) before quantisation" if kind == "vq_vae" else "mu(A) and mu(B)"
    assert said in proc.stdout and "linear path" in proc.stdout
    record = (tmp_path / "interpolation.json").read_text()
    assert '"path": "linear"' in record and said in record
    assert (tmp_path / "interpolation.png").stat().st_size > 0


def test_the_latent_paths_end_exactly_at_their_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    for path in ("linear", "slerp"):
        points = trained.latent_path(a, b, 7, path)
        assert torch.equal(points[0], a) and torch.equal(points[-1], b), path
    torch.testing.assert_close(trained.latent_path(a, b, 3)[1], (a + b) / 2)
    # slerp between orthogonal unit vectors: the midpoint is on the unit circle, at 45 degrees
    e1, e2 = torch.eye(2)
    torch.testing.assert_close(trained.latent_path(e1, e2, 3, "slerp")[1],
                               torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    assert trained.latent_path(e1, 2 * e1, 3, "slerp")[1].tolist() == [1.5, 0.0]  # parallel


def test_the_vq_vae_interpolates_before_quantisation(runs, images):
    model = trained.load(runs["vq_vae"] / "checkpoint.pt")
    x = model.preprocess([images / "b.png", images / "z.png"])
    z = model.encoder_outputs(x)
    middle = model.decode(model.quantize((z[:1] + z[1:]) / 2))
    torch.testing.assert_close(model.interpolate(x[0], x[1], steps=3)[1:2], middle)
    with pytest.raises(UserError, match="linearly between encoder outputs"):
        model.interpolate(x[0], x[1], steps=3, path="slerp")


# ---- --encode and --reconstruct on a folder --------------------------------------------------
@pytest.mark.parametrize("kind", ["standard_vae", "vq_vae"])
def test_encode_gives_one_row_per_readable_image_in_file_order(runs, kind, images, tmp_path):
    proc = command("--checkpoint", runs[kind] / "checkpoint.pt", "--encode", images,
                   "--batch-size", 3, "--out", tmp_path / "codes.npz")
    assert re.search(r"skipped 1 unreadable file: \S*broken\.png \(", proc.stdout)
    with np.load(tmp_path / "codes.npz") as f:
        names = [str(images / n) for n in READABLE]
        assert f["files"].tolist() == names and str(f["kind"]) == kind
        model = trained.load(runs[kind] / "checkpoint.pt")
        one_by_one = [model.encode(model.preprocess(n)) for n in names]
        if kind == "vq_vae":
            assert f["codes"].shape == (4, 16, 16)
            assert np.array_equal(f["codes"], torch.cat(one_by_one).numpy())
        else:
            assert f["mu"].shape == f["logvar"].shape == (4, 4)
            for column, i in (("mu", 0), ("logvar", 1)):
                np.testing.assert_allclose(f[column], torch.cat([c[i] for c in one_by_one]),
                                           rtol=1e-5, atol=1e-6)


def test_reconstruct_writes_each_images_error_beside_it(runs, images, tmp_path):
    proc = command("--checkpoint", runs["beta_vae"] / "checkpoint.pt", "--reconstruct",
                   images / "z.png", images / "broken.png", images / "sub", "--out", tmp_path)
    assert "broken.png" in proc.stdout and "4 images" not in proc.stdout
    with open(tmp_path / "reconstructions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [str(images / "z.png"), str(images / "sub" / "c.jpg")]
    model = trained.load(runs["beta_vae"] / "checkpoint.pt")
    x = model.preprocess([images / "z.png", images / "sub" / "c.jpg"])
    mse = (model.reconstruct(x) - x).pow(2).flatten(1).mean(1)
    for row, e in zip(rows, mse.tolist()):
        assert float(row["mse"]) == pytest.approx(e, rel=1e-5)
        assert float(row["psnr_db"]) == pytest.approx(-10 * np.log10(e), abs=1e-3)
    # one row per image: originals beside reconstructions, 32 px tiles and a label column
    assert pixels_of(tmp_path / "reconstructions.png").shape[0] == 2 * (32 + 2) + 2


# ---- preprocessing: exactly the run's path, conversions said -----------------------------------
def test_preprocess_reads_as_the_folder_run_did_and_converts_channels(runs, images, capsys):
    rgb = trained.load(runs["beta_vae"] / "checkpoint.pt")                # a folder run, 32 px
    x = rgb.preprocess([images / "b.png", images / "a_grey.png"])
    said = capsys.readouterr().out
    assert "converted 1 image from grey to RGB" in said and "a_grey.png" in said
    assert np.array_equal((x[0] * 255).round().byte().numpy(),
                          image_folders.decode_image(images / "b.png", 32, 3))
    assert torch.equal(x[1, 0], x[1, 1]) and torch.equal(x[1, 1], x[1, 2])
    grey = trained.load(runs["standard_vae"] / "checkpoint.pt")          # dSprites, 1 channel
    x = grey.preprocess(images / "b.png")
    assert "from colour to grey" in capsys.readouterr().out
    assert np.array_equal((x[0] * 255).round().byte().numpy(),
                          image_folders.decode_image(images / "b.png", 64, 1))
    with pytest.raises(UserError, match="no readable image"):
        grey.preprocess(images / "broken.png")
    with pytest.raises(UserError, match=r"expected images \(B, 1, 64, 64\)"):
        grey.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match="torch.uint8"):                    # pixels, not [0, 1]
        grey.encode(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))


def test_a_celeba_run_reads_images_through_its_own_crop(tmp_path, capsys):
    """CelebA's decoding: the run's --crop centre crop, then the resize, as its cache holds
    them; a file smaller than the crop is skipped with its size."""
    import beta_vae
    args = beta_vae.check_args(beta_vae.parse_args(
        ["--dataset", "celeba", "--image-size", "32", "--crop", "120", "--latent", "4"]))
    torch.save({"kind": "beta_vae", "args": vars(args), "data": {"channels": 3, "image_size": 32},
                "model": beta_vae.build_model(args, 3, 32).state_dict()}, tmp_path / "c.pt")
    model = trained.load(tmp_path / "c.pt")
    face = colour_image(tmp_path / "face.jpg", 0, size=(218, 178))
    small = colour_image(tmp_path / "small.jpg", 1, size=(100, 100))
    x = model.preprocess([face, small])
    assert "small.jpg (is 100x100, smaller than the 120x120 centre crop)" in capsys.readouterr().out
    expected = utils._decode_celeba(([str(face)], 120, 32))
    assert np.array_equal((x * 255).round().byte().numpy(), expected)


# ---- bad input: one line each -------------------------------------------------------------------
def one_line_error(proc, *fragments, status=1):
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_unknown_damaged_or_prior_checkpoints_are_one_line(runs, tmp_path):
    torch.save({"kind": "gan", "model": {}, "args": {}}, tmp_path / "gan.pt")
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    for path, said in ((tmp_path / "gan.pt", "unknown kind 'gan'"),
                       (tmp_path / "damaged.pt", "damaged or not a checkpoint"),
                       (runs["vq_vae"] / "prior.pt", "load the checkpoint.pt beside it"),
                       (tmp_path / "absent.pt", "no checkpoint at")):
        one_line_error(command("--checkpoint", path, "--samples", 4, "--out", tmp_path / "o",
                               check=False), said)
        with pytest.raises(CheckpointError):
            trained.load(path)
    assert not (tmp_path / "o").exists()


def test_sampling_a_vq_vae_without_its_prior_names_the_file_and_the_command(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(runs["vq_vae"] / "checkpoint.pt", run)
    proc = command("--checkpoint", run / "checkpoint.pt", "--samples", 4, "--out", tmp_path / "o",
                   check=False)
    one_line_error(proc, f"no PixelCNN prior at {run / 'prior.pt'}",
                   f"python vq_vae.py --out {run} --resume --prior-epochs")
    # a prior fitted to another state of the VQ-VAE is refused
    state = torch.load(runs["vq_vae"] / "prior.pt", weights_only=True)
    state["vq_step"] += 1
    torch.save(state, run / "prior.pt")
    one_line_error(command("--checkpoint", run / "checkpoint.pt", "--samples", 4, "--out",
                           tmp_path / "o", check=False), "another VQ-VAE state")


def test_bad_counts_endpoints_and_outputs_are_one_line(runs, images, tmp_path):
    ckpt = runs["standard_vae"] / "checkpoint.pt"
    for n in (0, -3):
        one_line_error(command("--checkpoint", ckpt, "--samples", n, "--out", tmp_path,
                               check=False), "must be a positive integer", status=2)
    model = trained.load(ckpt)
    for n in (0, -1, 2.5):
        with pytest.raises(UserError, match="positive integer"):
            model.sample(n)
    with pytest.raises(UserError, match="positive number"):
        model.sample(4, temperature=0)
    one_line_error(command("--checkpoint", ckpt, "--interpolate", images / "b.png",
                           images / "nope.png", "--out", tmp_path / "i", check=False),
                   f"interpolation endpoint {images / 'nope.png'} does not exist")
    one_line_error(command("--checkpoint", ckpt, "--interpolate", images / "b.png",
                           images / "broken.png", "--out", tmp_path / "i", check=False),
                   "cannot read the interpolation endpoint")
    one_line_error(command("--checkpoint", ckpt, "--reconstruct", images / "nope.png",
                           "--out", tmp_path / "r", check=False), "nope.png does not exist")
    one_line_error(command("--checkpoint", ckpt, "--encode", images / "broken.png", "--out",
                           tmp_path / "c.npz", check=False), "no readable image")
    one_line_error(command("--checkpoint", ckpt, "--encode", images, "--temperature", 0.5,
                           "--out", tmp_path / "c.npz", check=False),
                   "--temperature applies to --samples, not --encode")
    # an output path that is an existing file; earlier outputs are kept unless --overwrite
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    one_line_error(command("--checkpoint", ckpt, "--samples", 2, "--out", existing,
                           check=False), f"--out {existing} is a file")
    one_line_error(command("--checkpoint", ckpt, "--encode", images, "--out", existing,
                           check=False), f"--out {existing} exists; --overwrite replaces it")
    assert existing.read_text() == "keep me"
    command("--checkpoint", ckpt, "--samples", 3, "--out", tmp_path / "s")
    one_line_error(command("--checkpoint", ckpt, "--samples", 2, "--out", tmp_path / "s",
                           check=False), "already holds the outputs of an earlier use")
    command("--checkpoint", ckpt, "--samples", 2, "--out", tmp_path / "s", "--overwrite")
    assert len(list((tmp_path / "s" / "samples").iterdir())) == 2        # none left stale


def test_every_flag_is_documented():
    import use_model
    actions = [a for a in use_model.parser()._actions if a.dest != "help"]
    assert len(actions) == 14
    help_text = run_cli("use_model.py", "--help").stdout
    for action in actions:
        assert action.help and len(action.help) > 20, action.dest
        assert action.option_strings[0] in help_text


# ---- the README's snippet, run as written ----------------------------------------------------
def test_the_readme_snippet_runs_as_written(runs, images, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Use a trained model"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 4 <= len(snippet.strip().splitlines()) <= 7
    checkpoint = re.search(r'trained\.load\("([^"]+)"\)', snippet).group(1)
    folder = re.search(r'preprocess\("([^"]+)"\)', snippet).group(1)
    (tmp_path / checkpoint).parent.mkdir(parents=True)
    shutil.copy(runs["vq_vae" if "vq" in checkpoint else "standard_vae"] / "checkpoint.pt",
                tmp_path / checkpoint)
    shutil.copytree(images, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(snippet, "README.md", "exec"), names)
    assert names["x"].shape == (4, 1, 64, 64)
    assert names["x_hat"].shape == names["x"].shape
    assert names["mu"].shape == names["logvar"].shape == (4, 4)
    assert names["samples"].shape[1:] == (1, 64, 64)
