"""Best defaults for the hardware: does `trainer.precision=auto` (bf16 autocast on AMX CPUs and
bf16 GPUs) and `trainer.compile=true` train to the same loss as fp32?

The same model, data, seed and step count under each setting; the loss curves are compared step by
step (smoothed over 10 steps) and at the final validation.

    python scripts/bench_precision.py --out section.md     # via `make bench BENCH=precision`
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402

ARGS = ["model=gpt-mini", "tokenizer.vocab_size=8192", "data.block_size=128", "data.batch_size=8",
        "optimizer.lr=1e-3", "trainer.val_check_interval=50", "trainer.limit_val_batches=10",
        "checkpoint.every_n_steps=100000", "logger=csv", "trainer.log_every_n_steps=1", "seed=7"]
SETTINGS = [  # name, overrides
    ("fp32 (32-true)", ["trainer.precision=32-true", "trainer.compile=false"]),
    ("bf16-mixed", ["trainer.precision=bf16-mixed", "trainer.compile=false"]),
    ("auto (the default)", ["trainer.precision=auto", "trainer.compile=false"]),
    ("auto + compile", ["trainer.precision=auto", "trainer.compile=true"]),
]


def _smoothed(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    steps = 20 if a.quick else a.steps
    curves, finals, speeds, precisions = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SETTINGS:
            run = Path(tmp) / str(len(curves))
            bigml_cmd("pretrain", *ARGS, *extra, f"trainer.max_steps={steps}", f"hydra.run.dir={run}")
            rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
            curves[name] = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
            m = json.loads((run / "metrics.json").read_text())
            finals[name], speeds[name], precisions[name] = m["val_loss"], m["tokens_per_sec"], m["precision"]
    ref = _smoothed(curves[SETTINGS[0][0]])
    rows = []
    for name, _ in SETTINGS:
        cur = _smoothed(curves[name])
        n = min(len(cur), len(ref))
        max_rel = max(abs(c - r) / r for c, r in zip(cur[:n], ref[:n], strict=True))
        rows.append([name, precisions[name], finals[name], f"{max_rel * 100:.1f}%", speeds[name],
                     speeds[name] / speeds[SETTINGS[0][0]]])
    a.out.write_text(f"""## Best defaults: precision and compile keep the loss curve

`bigml pretrain {' '.join(ARGS)} trainer.max_steps={steps}` with each setting below (same seed,
data and steps). "curve gap" is the largest relative difference between the 10-step-smoothed
training loss and the fp32 run's, over all steps. `auto` resolves to bf16-mixed only where bf16
matmuls beat fp32 (AMX CPUs, bf16 GPUs; measured at start-up on AVX512-BF16-only CPUs).

{table(["setting", "resolved precision", "final val_loss", "curve gap vs fp32", "tokens/s", "speed vs fp32"], rows)}
""")


if __name__ == "__main__":
    main()
