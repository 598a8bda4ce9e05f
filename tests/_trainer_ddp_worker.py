"""One rank of the Trainer DDP test (tests/integrations/test_transformers.py, torchrun, gloo on CPU).

Each rank builds its model with a different seed (DDP broadcasts rank 0's weights); the Trainer
runs MSTCallback for 8 steps. Rank 0 gathers every rank's masks and weights by hash and writes a
JSON verdict to the path given as the second argument.
"""
import hashlib
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from _models import hf_gpt2
from _torchrun import end_rank
from integrations.test_transformers import CFG, Blocks
from transformers import Trainer, TrainingArguments

from mst_compile.integrations.transformers import MSTCallback


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(run_dir: str, out_path: str) -> None:
    args = TrainingArguments(output_dir=run_dir, max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=2, save_steps=8, report_to="none", use_cpu=True, ddp_backend="gloo", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    torch.manual_seed(int(os.environ["RANK"]))  # different weights per rank until DDP broadcasts rank 0's
    model = hf_gpt2()
    cb = MSTCallback(CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[cb])
        trainer.train()
    mst = cb.sm.mst
    mine = (_digest(mst.masks().values()), _digest(p for _, p in sorted(model.state_dict().items())), mst.step_count)
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, mine)
    densities = [h["mst_density"] for h in trainer.state.log_history if "mst_density" in h]
    if dist.get_rank() == 0:
        verdict = {"world": dist.get_world_size(), "steps": [g[2] for g in got],
                   "masks_identical": len({g[0] for g in got}) == 1, "weights_identical": len({g[1] for g in got}) == 1,
                   "min_density": min(densities)}
        with open(out_path, "w") as f:
            json.dump(verdict, f)
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
