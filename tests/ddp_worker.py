"""Launched by tests/test_distributed.py under torchrun (2 CPU processes, gloo).

`fit OUT ARGS...`: run standard_vae.py and save this rank's parameters to OUT/rank<r>.pt.
`grad OUT`: compare the DDP gradient on per-rank batches of B with the single-process gradient
on the concatenated 2B batch, with the reparameterisation noise fixed; save the max difference.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standard_vae as sv  # noqa: E402
from conftest import first_phase  # noqa: E402
from training import distributed  # noqa: E402


def fit(out, argv):
    model, _, _ = first_phase(sv.main, sv.parse_args(argv))
    torch.save({k: v.clone() for k, v in model.state_dict().items()},
               Path(out) / f"rank{distributed.DIST.rank}.pt")
    distributed.cleanup()


def grad(out):
    from torch.nn.parallel import DistributedDataParallel
    distributed.setup(torch.device("cpu"))
    dist = distributed.DIST
    torch.manual_seed(0)
    model = sv.VAE(1, 28, 4, [8, 8], hidden=16)
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3), generator=g)      # the 2B batch
    eps = torch.randn(8, 4, generator=g)

    def loss(m, xs, es):
        logits, mu, logvar = m(xs, es)
        return sv.vae_loss(xs, logits, mu, logvar, "bce")["loss"]

    loss(model, x, eps).backward()
    single = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ddp = DistributedDataParallel(model)
    b = 4
    shard = slice(dist.rank * b, (dist.rank + 1) * b)
    loss(ddp, x[shard], eps[shard]).backward()
    diff = max((p.grad - s).abs().max().item() for p, s in zip(model.parameters(), single))
    scale = max(s.abs().max().item() for s in single)
    torch.save({"diff": diff, "scale": scale}, Path(out) / f"grad{dist.rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    {"fit": lambda: fit(sys.argv[2], sys.argv[3:]), "grad": lambda: grad(sys.argv[2])}[sys.argv[1]]()
