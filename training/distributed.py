"""Distributed data parallel under torchrun: this process's place among the ranks, the few
collectives the runs use, and sums kept on the device and added over ranks when read.

Every helper is a no-op in a single process, so the scripts call them unconditionally. `DIST`
is one object that `setup` fills in place: modules read it as `distributed.DIST` when they need
it, never copy it, so every reader (and a test that changes it) sees the same ranks."""
import datetime
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from training.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


DIST = Distributed()           # this process's place; filled in by setup under torchrun

# How long a collective may wait before the process group aborts it (NCCL's default: 10
# minutes). The longest wait is planned: rank 0 builds a data cache alone while the other ranks
# wait at a barrier (`main_first`). Decoding CelebA's 202,599 JPEGs took 50 s on 2 cores here,
# but one core reading them from a network file system, or a folder of a million images, takes
# far longer; two hours covers that. A hung collective is then reported after two hours.
TIMEOUT = timedelta(hours=2)


def setup(device):
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) and
    return the device this rank trains on: on CUDA, the GPU of its local rank (`local_gpu`).

    NCCL on CUDA, gloo on CPU, with a `TIMEOUT` for every collective. Without torchrun nothing
    changes and `device` is returned."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device
    import torch.distributed as dist
    DIST.rank, DIST.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    DIST.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = local_gpu(DIST.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


def local_gpu(local_rank, visible):
    """The GPU of local rank `local_rank` among the `visible` ones: its own index when there are
    enough; the one GPU a launcher that gives each process its own shows (SLURM
    --gpus-per-task=1, where every process sees its GPU as cuda:0); else one line saying how
    many processes this node can take (NCCL cannot share a GPU between ranks)."""
    if local_rank < visible:
        return torch.device("cuda", local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise UserError(f"local rank {local_rank} has no GPU: this node shows {visible} GPUs "
                    f"(cuda:0 to cuda:{visible - 1}); start at most {visible} processes on it "
                    f"(torchrun --nproc_per_node={visible})")


def cleanup():
    """Tear the process group down on every rank together: a rank that destroys it while rank 0
    is still writing outputs can abort at exit ("terminate called without an active
    exception", seen with gloo under torchrun)."""
    if DIST.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def data_parallel(module, device):
    """`module` wrapped in DistributedDataParallel under torchrun (gradients averaged over
    ranks), else itself. Buffers are not re-broadcast from rank 0 every step: the models keep
    theirs identical on every rank (the VQ-VAE's quantiser with its own collectives)."""
    if not DIST.active:
        return module
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    # the flag's name since torch 2.13; before, broadcast_buffers (now deprecated)
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers")
    return DDP(module, device_ids=[device] if device.type == "cuda" else None, **{flag: False})


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not DIST.active:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(bool(flag))], device=device)).item())


def broadcast(tensor, src=0):
    """Rank `src`'s `tensor` on every rank, in place (a no-op in a single process)."""
    if DIST.active:
        import torch.distributed as dist
        dist.broadcast(tensor, src)
    return tensor


def should_stop(stop, step, log_every, device):
    """Whether to stop after this step on a SIGINT/SIGTERM (`stop`, a console.StopSignal).
    Under torchrun the ranks agree at log steps only (one small all-reduce), so that all of
    them save the same step."""
    if not DIST.active:
        return stop.requested is not None
    return step % log_every == 0 and any_rank(stop.requested, device)


def barrier():
    if DIST.active:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj):
    """A list of `obj` from every rank (just [obj] in a single process)."""
    if not DIST.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * DIST.world
    dist.all_gather_object(out, obj)
    return out


# How long the other ranks wait for rank 0 to build a data cache. A million CelebA-sized JPEGs
# take about 17 minutes at the 1,000 images/s measured on two busy cores (tests/bench_folder.py),
# large photos many times longer: past a process group's default timeout (NCCL's 10 minutes).
DATA_TIMEOUT = datetime.timedelta(hours=12)
_DATA_GROUP = []             # the gloo group they wait on, made once by every rank together


class main_first:
    """Let rank 0 run a block first (building a data cache, say), then the other ranks. They
    wait on a gloo group of their own with DATA_TIMEOUT; if rank 0 fails, torchrun stops them."""

    def __enter__(self):
        if DIST.active and not _DATA_GROUP:
            import torch.distributed as dist
            _DATA_GROUP.append(dist.new_group(backend="gloo", timeout=DATA_TIMEOUT))
        if not DIST.main:
            self.wait()

    def __exit__(self, *exc):
        if DIST.main and exc[0] is None:
            self.wait()
        return False

    @staticmethod
    def wait():
        if DIST.active:
            import torch.distributed as dist
            dist.barrier(group=_DATA_GROUP[0])


class Sums:
    """Running sums of a vector of `n` values kept on the device, read once at the end.

    float32 with Kahan compensation (each addition's rounding error is carried into the next),
    not float64, which Apple's MPS does not have: the sum of many batches keeps about float64
    accuracy for values computed in float32. `read()` adds the sums over ranks under torchrun and
    returns a float64 numpy array on the host.
    """

    def __init__(self, n, device):
        self.total = torch.zeros(n, dtype=torch.float32, device=device)
        self.error = torch.zeros_like(self.total)     # what the last additions lost, negated

    def add(self, values):
        y = values.float() - self.error
        t = self.total + y
        self.error = (t - self.total) - y
        self.total = t

    def read(self):
        both = all_reduce_sum(torch.stack([self.total, self.error])).cpu().numpy()
        return both[0].astype(np.float64) - both[1].astype(np.float64)
