"""The README's main jobs as a new user runs them, model sizes, and time against tokens.

    python scripts/bench_scaling.py --out section.md      # via `make bench BENCH=scaling`
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402


def run(tmp: Path, name: str, *args: str, env: dict | None = None) -> tuple[float, dict]:
    wall, _, _ = bigml_cmd("pretrain", *args, f"hydra.run.dir={tmp / name}", env=env)
    return wall, json.loads((tmp / name / "metrics.json").read_text())


def main() -> None:
    a = parser(__doc__).parse_args()
    quick = ["trainer.max_steps=10", "trainer.val_check_interval=5"] if a.quick else []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        defaults = []
        for model in ("bert-tiny", "gpt-tiny", "llama-tiny"):
            # a cold cache: tokenizer training and tokenization are part of the wall time
            wall, m = run(tmp, f"default-{model}", f"model={model}", *quick, env={"BIGML_CACHE_DIR": str(tmp / f"cache-{model}")})
            defaults.append([f"`bigml pretrain model={model}`", f"{wall:.0f}", f"{m['train_time_s']:.0f}",
                             f"{m['val_loss_initial']:.2f}", f"{m['val_loss']:.2f}", f"{m['tokens_per_sec']:.0f}"])

        sizes = []
        steps = 10 if a.quick else 40
        shapes = {"gpt-tiny (2x128)": ["model=gpt-tiny"],
                  "gpt-mini (4x256)": ["model=gpt-mini", "data.block_size=256", "data.batch_size=16"],
                  "gpt 8x512 (~30M)": ["model=gpt-mini", "model.num_layers=8", "model.hidden_size=512", "model.num_heads=8",
                                       "model.intermediate_size=2048", "data.block_size=256", "data.batch_size=16"]}
        for label, args in shapes.items():
            _, m = run(tmp, f"size-{len(sizes)}", *args, f"trainer.max_steps={steps}", "trainer.val_check_interval=1000",
                       "trainer.limit_val_batches=2", "logger=none")
            sizes.append([label, f"{m['params'] / 1e6:.1f}M", f"{m['tokens_per_sec']:.0f}", f"{m['mfu'] * 100:.1f}%"])
            precision = m["precision"]

        linear = []
        for n in ((10, 20) if a.quick else (100, 200, 400)):
            _, m = run(tmp, f"steps-{n}", "model=gpt-tiny", f"trainer.max_steps={n}", "trainer.val_check_interval=100000",
                       "trainer.limit_val_batches=2", "logger=none", "checkpoint.every_n_steps=100000")
            linear.append([n, f"{m['tokens_seen']:,}", f"{m['train_time_s']:.1f}", f"{m['train_time_s'] / m['tokens_seen'] * 1e6:.1f}"])

    text = f"""## Default runs, model sizes, and time against tokens

**The main job** (issue: under 3 minutes on 2 cores with validation loss clearly below its start).
Wall time of the whole command from a cold cache (tokenizer training and corpus packing
included), default settings (300 steps of 32 x 128 tokens, precision auto = {precision} here):

{table(["command", "wall s", "train s", "val loss start", "val loss end", "tokens/s"], defaults)}

**Model sizes** (`bigml pretrain <model args> trainer.max_steps={steps}`, {precision}, MFU against
the best matmul FLOP/s measured on this CPU in that precision):

{table(["model", "params", "tokens/s", "MFU"], sizes)}

**Time is linear in tokens** (`bigml pretrain model=gpt-tiny trainer.max_steps=N`, training time
only):

{table(["steps", "tokens", "train s", "us per token"], linear)}
"""
    a.out.write_text(text)


if __name__ == "__main__":
    main()
