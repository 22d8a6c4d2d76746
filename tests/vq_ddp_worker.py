"""Launched by tests/test_vq_vae.py under torchrun (2 CPU processes, gloo):

    python -m torch.distributed.run --nproc_per_node=2 tests/vq_ddp_worker.py OUT ARGS...

1. The quantiser alone, one training step on each rank's half of a joint batch:
   - `ema`: EMA codebook without restart; saves the initial state, the joint batch and the state
     after the step, for a single-process reference on the joint batch;
   - `restart/<kind>`: a collapsed codebook (15 of 16 codes dead), each rank with its own batch
     and its own RNG seed; saves the codebook after the restart and the rank's batch.
   Written to OUT/quantizer<rank>.pt.
2. vq_vae.py's VQ-VAE phase with ARGS (the real training path, no prior), once with ARGS as
   given (OUT/fit<rank>.pt) and once with `--codebook loss` appended and the run folder
   suffixed `-loss` (OUT/fit_loss<rank>.pt): this rank's state_dict, the batches it trained on,
   the data variance.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
import vq_vae as vq  # noqa: E402
from conftest import collapsed_quantizer, first_phase  # noqa: E402
from training import distributed  # noqa: E402


def quantizer(out, rank):
    g = torch.Generator().manual_seed(1)
    joint = torch.randn(4, 4, 3, 3, generator=g)                 # (2 ranks x 2, D, H, W)
    mine = joint[2 * rank:2 * rank + 2]
    torch.manual_seed(0)                                          # the same init on both ranks
    q = vq.VectorQuantizer(16, 4, "ema", decay=0.9, restart=False)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    _, _, terms = q(mine)
    saved = {"ema": {"before": before, "joint": joint, "after": q.state_dict(),
                     "perplexity": terms["perplexity"], "used": terms["used"]}}
    for kind in ("ema", "loss"):
        q = collapsed_quantizer(kind, restart=True)
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(10 + rank))
        torch.manual_seed(100 + rank)                             # each rank its own draws
        q(z)
        saved[f"restart/{kind}"] = {"codebook": q.codebook.detach().clone(),
                                    "ema_count": q.ema_count.clone(), "batch": z}
    torch.save(saved, Path(out) / f"quantizer{rank}.pt")


def fit(out, argv, name):
    seen = []
    epoch = utils.DeviceBatches.epoch

    def recording(self, *args, **kwargs):           # the batches this rank trains on
        for x in epoch(self, *args, **kwargs):
            seen.append(x.clone())
            yield x

    utils.DeviceBatches.epoch = recording
    try:
        model, settings, trained = first_phase(vq.main,
                                               vq.parse_args([*argv, "--prior-epochs", "0"]))
    finally:
        utils.DeviceBatches.epoch = epoch
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()},
                "batches": torch.stack(seen), "variance": settings.saved["data"]["variance"],
                "step": trained.step}, Path(out) / f"{name}{distributed.DIST.rank}.pt")


def main(out, argv):
    distributed.setup(torch.device("cpu"))
    quantizer(out, distributed.DIST.rank)
    fit(out, argv, "fit")
    run_folder = argv[argv.index("--out") + 1]
    fit(out, [*argv, "--codebook", "loss", "--out", f"{run_folder}-loss"], "fit_loss")
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
