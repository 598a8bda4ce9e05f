"""MST inside a Hugging Face Trainer: a small GPT-2 from a config (no download), byte-level text.

    python examples/hf_trainer.py --steps 200 --out runs/hf_trainer

The only MST line is `callbacks=[MSTCallback(...)]`: the callback captures the model at train begin,
trains it through the sparse ops and the hybrid sparse attention, logs MST's phase, density and
FLOPs with the Trainer's logs, and keeps its state in every checkpoint-N/ (resume with --resume).
At the end `export_hf` writes OUT/final, a folder `AutoModelForCausalLM.from_pretrained` loads; after
`import mst_compile.integrations.transformers` it runs the sparse attention it trained with.
"""
import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import mst_compile
from mst_compile.export import export_hf
from mst_compile.integrations.transformers import MSTCallback
from mst_compile.train.data import load_data

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200)
p.add_argument("--out", default="runs/hf_trainer")
p.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in --out")
args = p.parse_args()

BLOCK = 128


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of the built-in corpus (the Python standard library), one byte a token."""

    def __init__(self, split: str, n: int):
        self.data, self.split, self.n = load_data(None, None, val_fraction=0.05), split, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x, _ = self.data.batch(self.split, (i,), 1, BLOCK, seed=0)  # (1, BLOCK)
        return {"input_ids": x[0], "labels": x[0]}  # the model shifts the labels itself


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
mst = MSTCallback(mst_compile.MSTConfig(update_interval=max(1, args.steps // 20)))  # the run length: the Trainer's max_steps
trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
                           lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), logging_steps=10,
                           eval_strategy="steps", eval_steps=max(1, args.steps // 4), save_steps=max(1, args.steps // 4),
                           report_to="none", use_cpu=not torch.cuda.is_available()),
    train_dataset=ByteBlocks("train", args.steps * 8),
    eval_dataset=ByteBlocks("val", 32),
    callbacks=[mst],
)
trainer.train(resume_from_checkpoint=args.resume or None)
final = export_hf(model, f"{args.out}/final", mst.sm, block_size=BLOCK)  # the default stride: BLOCK / 8
print(f"done: density {mst.sm.mst.density():.3f}, FLOP reduction {mst.sm.mst.flops.reduction:.2f}x, "
      f"Hugging Face checkpoint in {final}")
