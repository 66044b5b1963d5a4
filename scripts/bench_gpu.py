"""GPU plan check: on the first CUDA machine `make bench` runs on, train gpt-small with the GPU
settings and verify the MFU target; on a machine without CUDA, say so (no figure is invented).

    python scripts/bench_gpu.py --out section.md      # via `make bench BENCH=gpu`
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402

TARGET_MFU = 0.45
GPU_ARGS = ["model=gpt-small", "trainer=gpu", "data.block_size=1024", "data.batch_size=16", "tokenizer.vocab_size=50304",
            "trainer.max_steps=60", "trainer.val_check_interval=1000", "trainer.limit_val_batches=2", "logger=none",
            "checkpoint.every_n_steps=1000"]
PLAN = """Settings for H100-class GPUs (the `trainer=gpu` preset plus the arguments above):
- `trainer.precision=auto` resolves to bf16-mixed on Ampere and newer;
- AdamW with fused kernels (`optimizer.fused: null` picks them on CUDA and CPU alike);
- attention through PyTorch SDPA (flash / memory-efficient kernels; transformers' default);
- `trainer.compile=true` (the `gpu` preset) compiles each model with torch.compile;
- vocabulary padded to a multiple of 64 (`tokenizer.vocab_size=50304`) for tensor-core shapes;
- `trainer=fsdp` (sharded parameters, one unit per block, activation checkpointing) once a model
  no longer fits one GPU; `trainer=ddp` otherwise.
Target: at least 45% MFU for gpt-small (124M) at 16 x 1024 tokens per GPU."""


def main() -> None:
    a = parser(__doc__).parse_args()
    import torch

    if not torch.cuda.is_available():
        a.out.write_text(f"""## GPU plan

{PLAN}

Not verified here: this machine has no CUDA device. On the first GPU machine, `make bench BENCH=gpu`
runs `bigml pretrain {' '.join(GPU_ARGS)}` and writes the measured tokens/s and MFU against the
target in this section.
""")
        return
    with tempfile.TemporaryDirectory() as tmp:
        bigml_cmd("pretrain", *GPU_ARGS, f"hydra.run.dir={tmp}/run")
        m = json.loads(Path(tmp, "run", "metrics.json").read_text())
    mfu = m.get("mfu") or 0.0
    verdict = "met" if mfu >= TARGET_MFU else "missed"
    a.out.write_text(f"""## GPU plan

{PLAN}

`bigml pretrain {' '.join(GPU_ARGS)}` on {torch.cuda.get_device_name(0)}:

{table(["tokens/s", "MFU", "target", "verdict"], [[m['tokens_per_sec'], f"{mfu * 100:.1f}%", f"{TARGET_MFU * 100:.0f}%", verdict]])}
""")
    if verdict == "missed":
        sys.exit(1)


if __name__ == "__main__":
    main()
