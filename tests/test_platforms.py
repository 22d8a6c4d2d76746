"""The machines students have, simulated on the CPU by monkeypatching torch.cuda and
torch.backends.mps: a Colab T4, a V100 with a wheel built for newer GPUs, an A100, a CPU without
bf16, a Mac, a node with 4 GPUs or one per process, torchrun, Windows. Each test names the
hardware it stands in for; tests/test_gpu.py runs on a real GPU."""
import json
import sys

import numpy as np
import pytest
import torch

import beta_vae as bv
import beta_vae_analyze as bva
import vq_vae as vq
from test_runs import DtypeLog, Float64Sums
from training import checkpoints, devices, distributed, files, loop
from training.errors import UserError

GPUS = {"T4": ("Tesla T4", (7, 5)), "V100": ("Tesla V100-SXM2-16GB", (7, 0)),
        "P40": ("Tesla P40", (6, 1)),
        "P100": ("Tesla P100-PCIE-16GB", (6, 0)), "A100": ("NVIDIA A100-SXM4-40GB", (8, 0)),
        "L4": ("NVIDIA L4", (8, 9)), "H100": ("NVIDIA H100 80GB HBM3", (9, 0))}
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]     # torch 2.14's default wheel


@pytest.fixture
def gpu(monkeypatch):
    """`gpu(name)` makes torch.cuda describe that GPU (and torch.cuda.is_bf16_supported answer
    True, as it does for the emulated bf16 of a T4 or V100)."""
    def use(name, arches=CU130, count=1):
        label, capability = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: label)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return use


# ---- 1, 2: precision by a rule on the hardware ------------------------------------------------
def test_auto_precision_follows_the_hardware_not_a_timing(gpu, monkeypatch):
    cuda = torch.device("cuda")
    gpu("T4")
    assert devices.choose_precision("auto", cuda) == (
        "fp16", "precision: fp16 with loss scaling (auto: Tesla T4, compute capability 7.5, "
        "below 8.0: no bf16 in hardware, but fast fp16)")
    assert devices.grad_scaler(cuda, "fp16").is_enabled()
    gpu("V100")
    assert devices.choose_precision("auto", cuda)[0] == "fp16"
    gpu("P40")                                        # fp16 at 1/64 of fp32's rate
    assert devices.choose_precision("auto", cuda)[0] == "fp32"
    assert devices.choose_precision("fp16", cuda)[1].startswith("warning: precision fp16")
    for name in ("A100", "L4", "H100"):
        gpu(name)
        precision, line = devices.choose_precision("auto", cuda)
        assert precision == "bf16" and line.startswith(f"precision: bf16 (auto: {GPUS[name][0]}")
        assert not devices.grad_scaler(cuda, precision).is_enabled()

    # typed bf16 on a GPU that only emulates it: obeyed, with a warning
    gpu("T4")
    precision, line = devices.choose_precision("bf16", cuda)
    assert precision == "bf16" and line.startswith("warning: precision bf16 (--precision bf16), "
                                                   "but the hardware only emulates it")
    assert line.endswith("--precision auto picks fp16")

    # CPUs: AVX2 only, then AMX; nothing is timed
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "fma"})
    assert devices.choose_precision("auto", "cpu") == (
        "fp32", "precision: fp32 (auto: CPU has no native bf16 (no AMX or AVX-512 BF16): bf16 "
        "would be emulated)")
    precision, line = devices.choose_precision("bf16", "cpu")
    assert precision == "bf16" and line.startswith("warning:") and "picks fp32" in line
    precision, line = devices.choose_precision("fp16", "cpu")
    assert precision == "fp16" and line.startswith("warning:") and "slow on CPUs" in line
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    assert devices.choose_precision("auto", "cpu") == (
        "bf16", "precision: bf16 (auto: CPU has AMX BF16 and AVX-512 BF16)")
    assert devices.choose_precision("fp32", "cpu") == ("fp32", "precision: fp32 (--precision "
                                                               "fp32)")
    # a resumed run says where its precision came from, not that it was typed
    assert devices.choose_precision("bf16", "cpu", resumed=True) == (
        "bf16", "precision: bf16 (the run's precision, from its checkpoint; CPU has AMX BF16 "
        "and AVX-512 BF16)")
    # a Mac: no autocast on MPS, whatever is asked
    assert devices.choose_precision("auto", "mps")[0] == "fp32"
    precision, line = devices.choose_precision("fp16", "mps")
    assert precision == "fp32" and line.startswith("warning: precision fp32, not fp16")


def test_precision_is_rank_0s_under_torchrun(monkeypatch):
    monkeypatch.setattr(distributed.DIST, "world", 2)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [("fp16", "rank 0's"), obj])
    assert devices.choose_precision("auto", "cpu") == ("fp16", "rank 0's")


def test_autocast_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision True"):
        devices.autocast("cpu", True)                 # the old bool: never silently fp32


FP16_RUN = ["--dataset", "dsprites", "--limit", 512, "--batch-size", 32, "--log-every", 4,
            "--device", "cpu", "--eval-limit", 64, "--latent", 4, "--objective", "H",
            "--arch", "mlp", "--hidden", 64, "--mig-points", 0,   # fp16 convs are slow on CPUs
            "--lr", 3e-3]


@pytest.fixture
def default_algorithms():
    """Leaves the process as a run without --deterministic would (the flag sets global state)."""
    yield
    devices.set_algorithms("cpu", False)


def test_fp16_with_the_scaler_trains_on_cpu_and_resumes_with_its_state(tmp_path, cli,
                                                                        loss_dtypes,
                                                                        default_algorithms):
    """A T4's path, on the CPU: the networks in fp16 autocast, every loss term fp32, the loss
    falls; the scaler's state is in the checkpoint and a resumed run continues it exactly (with
    --deterministic, recorded with the run). A checkpoint without a scaler still resumes."""
    seen = loss_dtypes
    common = [*FP16_RUN, "--data-root", tmp_path / "data", "--precision", "fp16",
              "--deterministic"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("beta_vae.py", *common, "--max-steps", 24, "--out", straight)
    assert seen and all(dtype == torch.float16 for dtype, _ in seen)
    assert all(d == torch.float32 for _, terms in seen for d in terms.values())
    a = checkpoints.load(straight / "checkpoint.pt")
    assert a["log"][-1]["recon"] < 0.5 * a["log"][0]["recon"]
    assert a["args"]["precision"] == "fp16" and a["args"]["deterministic"] is True
    # the scale backs off from 2^16 at each overflow (a skipped step), then grows back
    assert 0 < a["scaler"]["scale"] <= 2.0 ** 16 and a["scaler"]["_growth_tracker"] > 0
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["precision"]["name"] == "fp16" and metrics["args"]["deterministic"] is True

    cli("beta_vae.py", *common, "--max-steps", 16, "--out", split)
    assert checkpoints.load(split / "checkpoint.pt")["scaler"] != a["scaler"]
    proc = cli("beta_vae.py", *FP16_RUN, "--data-root", tmp_path / "data", "--max-steps", 24,
               "--out", split, "--resume")
    assert "precision fp16 (the run's precision, from its checkpoint), but fp16 " \
        "convolutions are slow on CPUs" in proc.stdout
    b = checkpoints.load(split / "checkpoint.pt")
    assert b["scaler"] == a["scaler"]                # continued from step 16, not restarted
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    state = checkpoints.load(split / "checkpoint.pt")      # an older checkpoint: no scaler
    del state["scaler"]
    checkpoints.save(split / "checkpoint.pt", state)
    cli("beta_vae.py", *FP16_RUN, "--data-root", tmp_path / "data", "--max-steps", 28,
        "--out", split, "--resume")
    assert checkpoints.load(split / "checkpoint.pt")["scaler"]["scale"] <= 2.0 ** 16


# ---- 3, 5: the random-number state of the training device only --------------------------------
def test_a_checkpoint_with_4_gpu_generators_resumes_in_a_job_that_sees_1(monkeypatch):
    """Written on a node with 4 visible GPUs by the old code ("cuda": every GPU's state);
    resumed where one GPU is visible (set_rng_state_all would raise IndexError there)."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    old = {**devices.rng_state("cpu"), "cuda": states}
    del old["device"], old["device_type"]
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((s, i)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda s: (_ for _ in ()).throw(IndexError("list index out of range")))
    checkpoints.check_resumable({"model": {}, "optimizer": {}, "args": {}, "step": 1, "log": [],
                                 "history": [], "rng": old}, checkpoints.Path("c.pt"))
    checkpoints.restore_rng({"rng": old}, torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0][0], states[0]) and restored[0][1] == 0

    # what is saved now: the training GPU's generator alone, restored onto the GPU in use
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: states[i])
    new = devices.rng_state(torch.device("cuda", 2))
    assert torch.equal(new["device"], states[2]) and "cuda" not in new
    restored.clear()
    devices.set_rng_state(new, torch.device("cuda", 0))
    assert restored == [(new["device"], 0)]


def test_the_mps_generator_is_saved_and_restored(monkeypatch):
    generator = {"state": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state",
                        lambda s: generator.update(state=s.clone()))
    state = devices.rng_state(torch.device("mps"))
    generator["state"] = torch.zeros(8, dtype=torch.uint8)           # the run draws on
    devices.set_rng_state(state, torch.device("mps"))
    assert torch.equal(generator["state"], torch.arange(8, dtype=torch.uint8))
    assert devices.rng_state("cpu")["device"] is None                # the CPU: torch's own
    # a CUDA checkpoint resumed on a Mac: the GPU's state is not forced onto MPS
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: torch.zeros(16, dtype=torch.uint8))
    devices.set_rng_state(devices.rng_state(torch.device("cuda", 0)), torch.device("mps"))
    assert torch.equal(generator["state"], torch.arange(8, dtype=torch.uint8))


# ---- 4: a wheel without kernels for the GPU ---------------------------------------------------
def test_a_gpu_the_wheel_has_no_kernels_for_is_refused_in_one_line(gpu):
    gpu("V100")
    with pytest.raises(UserError) as e:
        devices.get_device("auto")
    line = str(e.value)
    assert "\n" not in line and line.startswith("Tesla V100-SXM2-16GB (compute capability 7.0) "
                                                "is not supported by this PyTorch build")
    assert "sm_75 sm_80" in line and "pip install torch torchvision --index-url " \
        "https://download.pytorch.org/whl/cu126" in line
    gpu("P100")
    with pytest.raises(UserError, match=r"P100-PCIE-16GB \(compute capability 6.0\)"):
        devices.get_device("cuda")
    for name in ("T4", "A100", "L4", "H100"):         # a same-major cubin no newer than the GPU
        gpu(name)
        assert devices.get_device("cuda") == torch.device("cuda")
    gpu("H100", arches=["sm_80", "compute_80"])       # PTX that the driver compiles for it
    assert devices.get_device("cuda") == torch.device("cuda")
    gpu("V100", arches=["sm_80", "compute_80"])       # PTX newer than the GPU does not run
    with pytest.raises(UserError, match="not supported"):
        devices.get_device("cuda")


# ---- 5: Apple MPS ------------------------------------------------------------------------------
def test_mps_never_calls_torch_autocast(monkeypatch):
    """torch 2.3 and 2.4 raise on torch.autocast("mps", enabled=False); our contexts never call
    it for MPS, and the quantiser's fp32 regions go through them."""
    real = torch.autocast
    calls = []

    def autocast(device_type, *args, **kwargs):
        calls.append(device_type)
        if device_type == "mps":
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    for precision in ("fp32", "bf16", "fp16"):
        with devices.autocast(torch.device("mps"), precision):
            pass
    with devices.autocast_off(torch.device("mps")):
        pass
    assert calls == []

    regions = []
    monkeypatch.setattr(devices, "autocast_off", lambda device: regions.append(
        torch.device(device).type) or real(torch.device(device).type, enabled=False))
    torch.manual_seed(0)
    model = vq.VQVAE(1, hidden=16, res_hidden=8, res_layers=1, num_codes=32, code_dim=8)
    opt = devices.adam(model.parameters(), 1e-3, "cpu")
    vq.train_step(model, opt, torch.rand(4, 1, 32, 32), 0.08, 0.25, "bf16")
    assert regions == ["cpu", "cpu"] and calls == ["cpu"]    # nearest, ema_update | the step's


def test_attribute_effect_makes_no_float64_tensor_and_equals_float64_sums(monkeypatch):
    """beta_vae_analyze's pixel sums, as on MPS (no float64): compensated float32 on the
    device, equal to plain float64 sums."""
    torch.manual_seed(0)
    model = bv.build_model(bv.check_args(bv.parse_args(["--dataset", "dsprites"])), 1, 64)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(300, 1, 64, 64, generator=g) * 255).to(torch.uint8)
    positive = torch.rand(300, generator=g) < 0.4
    vector = torch.randn(10, generator=g)
    signature = bva.pixel_signature(images, positive, ~positive).float()   # made on the host
    log = DtypeLog()
    with log:
        result = bva.attribute_effect(model, images, positive, ~positive, vector, signature,
                                      "cpu", strengths=(0.5, 2.0), batch=64)
    assert torch.float64 not in log.dtypes and torch.float32 in log.dtypes
    monkeypatch.setattr(bva, "Sums", Float64Sums)
    reference = bva.attribute_effect(model, images, positive, ~positive, vector, signature,
                                     "cpu", strengths=(0.5, 2.0), batch=64)
    for key in ("reconstructed", "adds", "signature_rms"):
        assert result[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    assert np.allclose(result["adds_by_strength"], reference["adds_by_strength"], rtol=1e-6)


# ---- 6: no host-device sync in a VQ-VAE step --------------------------------------------------
@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_a_vq_vae_training_step_calls_no_bincount(codebook, monkeypatch):
    """torch.bincount on CUDA reads its input's range back to the host: a sync in every step.
    The step's usage terms are still those of the batch's code counts."""
    torch.manual_seed(0)
    model = vq.VQVAE(1, hidden=16, res_hidden=8, res_layers=1, num_codes=32, code_dim=8,
                     codebook=codebook)
    opt = devices.adam(model.parameters(), 1e-3, "cpu")
    x = torch.rand(8, 1, 32, 32)
    real = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("bincount called"))
    indices, nearest = [], model.quantizer.nearest

    def spy(flat):
        found = nearest(flat)
        indices.append(found[0])
        return found
    monkeypatch.setattr(model.quantizer, "nearest", spy)
    terms = vq.train_step(model, opt, x, 0.08, 0.25)
    counts = real(indices[0], minlength=32).float()
    assert terms["perplexity"].item() == pytest.approx(vq.perplexity(counts).item(), rel=1e-6)
    assert terms["used"].item() == pytest.approx((counts > 0).float().mean().item())


# ---- 8: torchrun on the machines it meets ----------------------------------------------------
def test_local_rank_is_mapped_onto_the_visible_gpus_or_refused(gpu, monkeypatch):
    assert distributed.local_gpu(2, 4) == torch.device("cuda", 2)
    assert distributed.local_gpu(3, 1) == torch.device("cuda", 0)     # SLURM --gpus-per-task=1
    with pytest.raises(UserError) as e:
        distributed.local_gpu(5, 4)                   # --nproc_per_node 8 on a 4-GPU node
    assert "\n" not in str(e.value) and "torchrun --nproc_per_node=4" in str(e.value)

    # the whole join, a process of a SLURM job whose one visible GPU is its own
    gpu("A100", count=1)
    for k, v in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(k, v)
    for field in ("rank", "world", "local_rank"):     # restored after the test
        monkeypatch.setattr(distributed.DIST, field, getattr(distributed.DIST, field))
    joined = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: joined.append((backend, kw)))
    assert distributed.setup(torch.device("cuda")) == torch.device("cuda", 0)
    assert joined == [torch.device("cuda", 0), ("nccl", {
        "timeout": distributed.TIMEOUT, "device_id": torch.device("cuda", 0)})]
    assert distributed.TIMEOUT.total_seconds() > 10 * 60        # NCCL's default: 10 minutes

    joined.clear()                                    # gloo on CPUs gets the timeout too
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert joined == [("gloo", {"timeout": distributed.TIMEOUT, "device_id": None})]


# ---- 9: --deterministic ------------------------------------------------------------------------
def test_deterministic_sets_the_algorithms_and_cublas_before_any_gpu_work(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.set_algorithms(torch.device("cuda"), False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        devices.set_algorithms(torch.device("cuda"), True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        devices.set_algorithms("cpu", False)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


# ---- 10: Windows -------------------------------------------------------------------------------
def test_writes_and_the_run_folder_lock_work_without_o_nofollow_and_fcntl(tmp_path, monkeypatch):
    import filelock                                   # before fcntl goes: filelock's own choice
    monkeypatch.delattr("os.O_NOFOLLOW")
    monkeypatch.delattr("os.posix_fallocate")
    monkeypatch.setitem(sys.modules, "fcntl", None)   # `import fcntl` raises ImportError
    assert filelock.FileLock
    out = tmp_path / "run"
    files.prepare_out(out, fresh=True)
    files.write_json(out / "metrics.json", {"a": 1})
    files.atomic_write(out / "metrics.json", lambda f: f.write(b"{}"), keep_previous=True)
    assert (out / "metrics.json").read_text() == "{}" and (out / "metrics.prev.json").exists()
    checkpoints.save(out / "checkpoint.pt", {"model": {}, "args": {}, "step": 1})
    assert checkpoints.load(out / "checkpoint.pt")["step"] == 1
    files.reserve_space(out, 3 * 2**20)               # zeros written: no posix_fallocate

    held = files._flock(tmp_path / "x.lock", False, "the run folder x")
    assert isinstance(held, files._portable_lock)
    with pytest.raises(UserError) as e:               # a second process's view of it
        files._flock(tmp_path / "x.lock", False, "the run folder x")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"the run folder x is in use by pid {__import__('os').getpid()}")
    held.close()
    files._flock(tmp_path / "x.lock", False, "the run folder x").close()   # free again
    with files.building(tmp_path, "a cache"):
        pass


# ---- 11: smaller items -------------------------------------------------------------------------
def test_resuming_on_another_device_takes_its_adam_path(tmp_path, monkeypatch):
    """Saved where Adam is fused (a GPU: FAST_PATHS), resumed on a CPU: foreach, not fused."""
    model = torch.nn.Linear(3, 2)
    monkeypatch.setattr(devices, "FAST_PATHS", {"cuda", "cpu"})
    opt = devices.adam(model.parameters(), 1e-3, "cpu")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "log": [],
             "history": [], "rng": devices.rng_state("cpu")}
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    monkeypatch.setattr(devices, "FAST_PATHS", {"cuda"})
    opt = devices.adam(model.parameters(), 1e-3, "cpu")
    settings = loop.Settings("standard_vae", tmp_path, 2, 1, 4, 1e-3, {})
    loop.resume(model, opt, state, settings)
    group = opt.param_groups[0]
    assert (group["fused"], group["foreach"]) == (None, True)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()


def test_the_prior_takes_its_own_precision_not_the_vq_vaes_as_typed(tmp_path, monkeypatch, cli):
    """The VQ-VAE resolves auto; the prior resolves auto for itself, and says so, and keeps it
    in prior.pt. (auto is taken as fp32 here: the prior samples slowly in bf16 on a CPU.)"""
    monkeypatch.setattr(devices, "auto_precision", lambda device: ("fp32", "taken as no bf16"))
    settings = []
    monkeypatch.setattr(devices, "set_algorithms", lambda d, det: settings.append((d.type, det)))
    args = ["--dataset", "dsprites", "--limit", 256, "--batch-size", 32, "--eval-limit", 64,
            "--hidden", 16, "--res-hidden", 8, "--res-layers", 1, "--codes", 32, "--latent", 8,
            "--prior-channels", 16, "--prior-layers", 3, "--prior-kernel", 3,
            "--prior-batch-size", 32, "--log-every", 2, "--device", "cpu", "--max-steps", 2,
            "--data-root", tmp_path / "data", "--out", tmp_path / "vq"]
    proc = cli("vq_vae.py", *args)
    assert "precision: fp32 (auto: taken as no bf16)" in proc.stdout.splitlines()
    assert "prior precision: fp32 (auto: taken as no bf16)" in proc.stdout.splitlines()
    assert settings == [("cpu", False)]               # cuDNN's setting, as in every script
    metrics = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert metrics["prior"]["precision"]["why"] == "fp32 (auto: taken as no bf16)"
    assert checkpoints.load(tmp_path / "vq" / "prior.pt")["args"]["precision"] == "fp32"


# ---- the GPU check, ready for the day we have one ---------------------------------------------
def test_the_gpu_checks_commands_all_parse_and_its_dry_run_starts(tmp_path, capsys):
    import importlib

    import gpu_check
    for dry_run in (False, True):
        plan = gpu_check.steps(tmp_path, dry_run, tmp_path / "data")
        assert [s.name for s in plan][:2] == ["env", "tests"]
        assert [s.name for s in plan][2] == "bench"     # the numbers first
        for step in plan:
            argv = list(map(str, step.argv))
            if argv[0].endswith(".py"):                  # each script takes its flags
                module = importlib.import_module(argv[0][:-3])
                args = module.parse_args(argv[1:])
                assert args.device == ("cpu" if dry_run else "cuda"), step.name
    assert gpu_check.parse_args([]).budget < 10 * 60              # under 10 minutes in all
    assert gpu_check.main(gpu_check.parse_args(["--dry-run", "--only", "env", "--out",
                                                str(tmp_path / "check")])) == 0
    env = (tmp_path / "check" / "env.log").read_text()
    assert '"arch_list"' in env and '"auto"' in env
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("env", "ok")]
    assert "outputs in" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_checks_whole_dry_run_passes_on_the_cpu(tmp_path):
    import gpu_check
    out = tmp_path / "check"
    assert gpu_check.main(gpu_check.parse_args(["--dry-run", "--out", str(out)])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["status"] == "ok" for s in summary["steps"]) and len(summary["steps"]) == 8
    assert set(summary["runs"]) == {"standard_vae", "beta_vae", "beta_vae_fp32", "vq_vae"}
    assert summary["headline_30_epochs_min"] > 0
