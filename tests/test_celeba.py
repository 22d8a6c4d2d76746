"""CelebA on fixtures in both real layouts, and attribute arithmetic."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import beta_vae_analyze as ba
import utils
from conftest import N, face_colour, write_celeba
from faces import ATTRIBUTES, write_faces

@pytest.mark.parametrize("layout", ["official", "mirror"])
def test_celeba_splits_attributes_crop_and_size(tmp_path, layout):
    files, attrs = write_celeba(tmp_path, layout)
    train = utils.load_dataset("celeba", tmp_path, "train", image_size=32)
    valid = utils.load_dataset("celeba", tmp_path, "valid", image_size=32)
    test = utils.load_dataset("celeba", tmp_path, "test", image_size=32)
    assert (len(train), len(valid), len(test)) == (24, 6, 6)
    assert train.images.shape == (24, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.files == files[30:] and train.label_names == ATTRIBUTES
    assert np.array_equal(test.labels.numpy(), attrs[30:])
    for data, offset in ((train, 0), (test, 30)):
        for i in (0, len(data) - 1):
            pixels = data.images[i].float().mean((1, 2))    # the crop holds no red border
            assert torch.allclose(pixels, torch.tensor(face_colour(offset + i)).float(), atol=3)
    limited = utils.load_dataset("celeba", tmp_path, "train", limit=5, image_size=32)
    assert torch.equal(limited.images, train.images[:5])


def test_celeba_cache_is_reused_and_invalidated(tmp_path):
    write_celeba(tmp_path)
    utils.load_dataset("celeba", tmp_path, "test", image_size=32)
    cache = tmp_path / "celeba" / "celeba_cache_crop148_32px.npy"
    stamp = cache.stat().st_mtime_ns
    utils.load_dataset("celeba", tmp_path, "train", image_size=32)
    assert cache.stat().st_mtime_ns == stamp                     # reused
    utils.load_dataset("celeba", tmp_path, "test", image_size=28, crop=140)
    assert (tmp_path / "celeba" / "celeba_cache_crop140_28px.npy").exists()   # new size: new cache
    # a changed file list (here: one image fewer) makes the old cache stale
    attr = tmp_path / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([str(N - 1), lines[1]] + lines[2:-1]) + "\n")
    data = utils.load_dataset("celeba", tmp_path, "test", image_size=32)
    assert len(data) == 5 and cache.stat().st_mtime_ns != stamp


def test_interrupted_cache_build_resumes(tmp_path):
    files, _ = write_celeba(tmp_path)
    folder = tmp_path / "celeba" / "img_align_celeba"
    cache = tmp_path / "cache.npy"
    utils.build_celeba_cache(folder, files, 148, 16, cache, {}, chunk=8, workers=1)
    full = np.load(cache)
    # pretend a build stopped after chunks 0 and 8: chunk 0 holds a marker that must survive
    partial = tmp_path / "cache.partial.npy"
    arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=full.shape)
    arr[:16] = full[:16]
    arr[:8] = 7
    arr.flush()
    del arr
    (tmp_path / "cache.progress.json").write_text(json.dumps({"files": N, "done": [0, 8]}))
    os.remove(cache)
    utils.build_celeba_cache(folder, files, 148, 16, cache, {}, chunk=8, workers=2)
    resumed = np.load(cache)
    assert (resumed[:8] == 7).all()                               # not decoded again
    assert np.array_equal(resumed[8:], full[8:])
    assert not partial.exists() and not (tmp_path / "cache.progress.json").exists()


def test_celeba_errors_are_clear(tmp_path):
    with pytest.raises(utils.DatasetNotFound) as e:
        utils.load_dataset("celeba", tmp_path, "train")
    assert str(tmp_path / "celeba") in str(e.value) and "quota" in str(e.value)
    assert "--dataset dsprites" in str(e.value)
    write_celeba(tmp_path)
    partition = tmp_path / "celeba" / "list_eval_partition.txt"
    partition.rename(tmp_path / "elsewhere.txt")
    with pytest.raises(utils.DatasetNotFound, match="missing .*list_eval_partition.txt"):
        utils.load_dataset("celeba", tmp_path, "train")
    (tmp_path / "elsewhere.txt").rename(partition)
    (tmp_path / "celeba" / "img_align_celeba" / "000007.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(utils.UserError, match="cannot read image .*000007.jpg"):
        utils.load_dataset("celeba", tmp_path, "train", image_size=32)
    with pytest.raises(utils.UserError, match="at most the crop"):
        utils.load_dataset("celeba", tmp_path, "train", image_size=200)
    with pytest.raises(utils.UserError, match="unknown split"):
        utils.load_dataset("celeba", tmp_path, "validation")


# ---- attribute vectors -------------------------------------------------------------------------
def test_attribute_vector_points_along_the_latent_the_attribute_moves():
    g = torch.Generator().manual_seed(0)
    attribute = torch.rand(2000, generator=g) < 0.4
    # a stub encoder: latent 2 moves by +3 with the attribute, the rest is noise
    mu = torch.randn(2000, 5, generator=g) * 0.5
    mu[:, 2] += 3 * attribute
    vector = ba.attribute_vector(mu, attribute, ~attribute)
    assert vector.argmax() == 2 and vector[2] == pytest.approx(3, abs=0.1)
    assert vector[[0, 1, 3, 4]].abs().max() < 0.15


def test_attribute_groups_on_every_kind_of_label(tmp_path):
    files, attrs = write_celeba(tmp_path)
    celeba = utils.load_dataset("celeba", tmp_path, "train", image_size=32)
    smiling = ATTRIBUTES.index("Smiling")
    male = ATTRIBUTES.index("Male")
    pos, neg = ba.attribute_groups(celeba, "Smiling", "Male=0")
    assert pos.tolist() == [bool(a[smiling] == 1 and a[male] == 0) for a in attrs[:24]]
    assert neg.tolist() == [bool(a[smiling] == 0 and a[male] == 0) for a in attrs[:24]]
    with pytest.raises(utils.UserError, match="unknown attribute 'Smile'.*Smiling"):
        ba.attribute_groups(celeba, "Smile")

    sprites = utils.load_dataset("dsprites", tmp_path, "train", limit=200)
    pos, neg = ba.attribute_groups(sprites, "scale")
    assert (sprites.labels[pos, 2] >= 3).all() and (sprites.labels[neg, 2] <= 2).all()
    pos, neg = ba.attribute_groups(sprites, "shape=heart", "scale=5")
    assert (sprites.labels[pos, 1] == 2).all() and (sprites.labels[neg, 1] != 2).all()
    assert (sprites.labels[pos | neg, 2] == 5).all()
    with pytest.raises(utils.UserError, match="shape needs a value"):
        ba.attribute_groups(sprites, "shape")

    digits = utils.ImageSet("mnist", torch.zeros(6, 1, 28, 28, dtype=torch.uint8),
                            torch.tensor([3, 1, 3, 0, 7, 3]), label_names=["digit"])
    pos, neg = ba.attribute_groups(digits, "digit=3")
    assert pos.tolist() == [True, False, True, False, False, True] and (pos ^ neg).all()


def test_smile_vector_end_to_end_on_a_fixture(tmp_path, cli):
    write_celeba(tmp_path)
    run = tmp_path / "run"
    cli("beta_vae.py", "--data-root", tmp_path, "--image-size", 32, "--batch-size", 8,
           "--max-steps", 4, "--eval-limit", 6, "--out", run, "--device", "cpu")
    proc = cli("beta_vae_analyze.py", "--checkpoint", run / "checkpoint.pt",
                  "--attribute", "Smiling", "--condition", "Male=0", "--n-images", 30,
                  "--images", "000003.jpg,000035.jpg", "--strengths=-1:2:4")
    assert "Smiling" in proc.stdout
    record = torch.load(run / "attribute_Smiling.pt", weights_only=True)
    assert record["vector"].shape == (10,) and record["images"] == ["000003.jpg", "000035.jpg"]
    assert record["strengths"].tolist() == [-1, 0, 1, 2]
    image = Image.open(run / "attribute_Smiling.png")
    assert image.size[0] > image.size[1] > 0                        # 2 rows, 5 columns
    bad = cli("beta_vae_analyze.py", "--checkpoint", run / "checkpoint.pt",
                 "--attribute", "Smile", "--n-images", 30, check=False)
    assert bad.returncode == 1 and "Smiling" in bad.stderr and "Traceback" not in bad.stderr


class PixelModel:
    """A stand-in autoencoder: the code is the image itself (or only the pixels `seen`), the
    decoder returns it, so reconstruction is exact where the code sees."""

    def __init__(self, seen=None):
        self.seen = seen

    def encoder(self, x):
        z = x.flatten(1).clone()
        if self.seen is not None:
            z[:, ~self.seen] = 0.5
        return z, torch.zeros_like(z)

    def decoder(self, z):
        return torch.logit(z.clamp(1e-6, 1 - 1e-6)).view(-1, 1, 4, 4)

    def mean_image(self, logits):
        return torch.sigmoid(logits)


def test_attribute_effect_is_one_for_an_exact_model_and_zero_for_a_blind_one():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(40, 120, (400, 1, 4, 4), generator=g, dtype=torch.uint8)
    attribute = torch.rand(400, generator=g) < 0.5
    images[attribute, 0, 0, :2] += 120                      # the attribute: two bright pixels
    mu = images.flatten(1).float() / 255
    vector = ba.attribute_vector(mu, attribute, ~attribute)
    signature = ba.pixel_signature(images, attribute, ~attribute)
    torch.testing.assert_close(signature.flatten().float(), vector)
    exact = ba.attribute_effect(PixelModel(), images, attribute, ~attribute, vector, signature,
                                "cpu", strengths=(0.0, 0.5))
    assert exact["reconstructed"] == pytest.approx(1.0, abs=1e-5)
    assert exact["adds"] == pytest.approx(1.0, abs=1e-4)     # the vector is the signature
    assert [a for a, _ in exact["adds_by_strength"]] == [0.0, 0.5, 1.0]
    assert [v for _, v in exact["adds_by_strength"]] == pytest.approx([0.0, 0.5, 1.0], abs=1e-4)
    assert "reconstructs Smiling (100%" in ba.effect_verdict("Smiling", exact)
    # a model that cannot see the attribute's pixels: its reconstructions keep none of it
    seen = torch.ones(16, dtype=torch.bool)
    seen[:2] = False
    blind_model = PixelModel(seen)
    blind_mu = blind_model.encoder(mu)[0]
    blind = ba.attribute_effect(blind_model, images, attribute, ~attribute,
                                ba.attribute_vector(blind_mu, attribute, ~attribute), signature,
                                "cpu")
    assert abs(blind["reconstructed"]) < 0.05 and abs(blind["adds"]) < 0.05
    assert "does not reconstruct Smiling" in ba.effect_verdict("Smiling", blind)
    assert "the vector is noise" in ba.effect_verdict("Smiling", blind)


@pytest.mark.slow
def test_headline_journey_on_a_small_face_set(tmp_path, script):
    """`python beta_vae.py --latent 10 --epochs 30` then the attribute analysis, shrunk only by
    size (1,000 synthetic faces at 32 px): CelebA's default objective (H, beta 1) is said at the
    start, its warm-up fits the run (no warning), the model uses its KL, and each attribute
    vector comes with a measured effect whose verdict matches its numbers."""
    write_faces(tmp_path, 1000)
    run = tmp_path / "run"
    train = script("beta_vae.py", "--data-root", tmp_path, "--image-size", 32, "--latent", 10,
                   "--epochs", 30, "--eval-limit", 100, "--out", run, "--device", "cpu",
                   timeout=900)
    said = [line for line in train.stdout.splitlines()       # after any data preparation
            if not line.startswith(("decoding CelebA into", "data: ", "precision: "))]
    assert said[0].startswith("objective H with beta 1: the default on celeba")
    assert "schedule: beta on the KL rises linearly from 0 to 1 over 36 steps" in train.stdout
    assert "warning" not in train.stdout
    assert "note: 360 steps are few for attribute vectors" in train.stdout     # and the fix:
    assert "train at least 4,000 steps (--epochs 334)" in train.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 360 and metrics["args"]["objective"] == "H"
    assert metrics["test"]["kl"] > 8                         # measured: 13 nats
    effects = {}
    for attribute in ("Eyeglasses", "Smiling"):
        proc = script("beta_vae_analyze.py", "--checkpoint", run / "checkpoint.pt",
                      "--attribute", attribute, "--n-images", 1000)
        effects[attribute] = json.loads((run / f"attribute_{attribute}.json").read_text())
        effect = effects[attribute]["effect"]
        assert effects[attribute]["verdict"] in proc.stdout
        noise = effect["reconstructed"] < ba.ENCODED
        assert ("the vector is noise" in effects[attribute]["verdict"]) == noise
        assert dict(effect["adds_by_strength"])[1.0] == effect["adds"]
        assert effect["held_out_with"] + effect["held_out_without"] == 100
    # glasses (dark frames, the larger signature) begin to be learnt in 360 steps and the
    # vector adds them (measured: 27% kept, 40% added)
    assert effects["Eyeglasses"]["effect"]["adds"] > 0.25
