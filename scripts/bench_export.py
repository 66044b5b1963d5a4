"""ONNX Runtime against PyTorch eager: `bigml export format=onnx` on a classifier and a causal LM.

    python scripts/bench_export.py --out section.md      # via `make bench BENCH=export`

The figures are the ones `bigml export` itself writes to export.json: the median of interleaved
forwards of PyTorch (eager, fp32) and onnxruntime (CPUExecutionProvider) on the same batch, with the
same thread count (threads=1: on the shared 2-core machine two threads spin against each other),
after the parity check on padded batches of several shapes.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import build_classifier, build_lm  # noqa: E402
from benchlib import bigml_cmd, parser, table  # noqa: E402


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeats = 5 if args.quick else 20
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows, commands = [], []
    try:
        models = {"classifier (MiniLM-L6 + 3-label head)": build_classifier(tmp / "cls"),
                  "causal LM (GPT-2 4 x 256, vocab 8k)": build_lm(tmp / "lm")}
        for label, model in models.items():
            for seq in (16, 128):
                out = tmp / f"out-{len(rows)}"
                cmd = ["export", f"model.path={model}", "format=onnx", f"output={out}", "threads=1",
                       "measure.batch_size=8", f"measure.seq_len={seq}", f"measure.repeats={repeats}"]
                wall, _, _ = bigml_cmd(*cmd, env={"HF_HUB_OFFLINE": "1", "CI": "1"})
                commands.append("bigml " + " ".join(cmd).replace(str(model), f"<{label.split(' ')[0]}>").replace(str(out), "<dir>"))
                r = json.loads((out / "export.json").read_text())
                lat = r["latency"]
                rows.append([label, f"{lat['batch_size']} x {lat['seq_len']}", f"{lat['torch_ms']:.1f}",
                             f"{lat['onnxruntime_ms']:.1f}", f"{lat['speedup']:.2f}x", f"{r['parity']['max_abs_diff']:.1e}",
                             f"{r['export_time_s']:.1f}"])
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["## Export: ONNX Runtime against PyTorch eager (CPU)", "",
             table(["model", "batch x tokens", "PyTorch eager ms", "onnxruntime ms", "speed-up", "max abs logit diff",
                    "export s"], rows), "",
             f"Median of {repeats} interleaved forwards each, fp32, one thread, the graph exported by torch.onnx "
             "(dynamo) without a KV cache. Commands:", "", "```bash", *commands, "```", ""]
    if args.quick:
        lines += ["(--quick: fewer repeats; figures indicative only)", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
