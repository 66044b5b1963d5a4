"""Instruction tuning (task=sft): bigml against TRL's SFTTrainer, full and LoRA, side by side, and
the generative accuracy it buys on real data.

    python scripts/bench_sft.py --out section.md      # via `make bench BENCH=sft`

1. A base: `bigml pretrain` of gpt-mini on the tweets' own text (so its vocabulary knows them).
2. The instruction set: `data=tweet-instructions` ("Is the sentiment of this tweet negative,
   neutral or positive?" -> the label), split once into train / val / test files.
3. Side by side, one after another in this run, on the same base, rows, batch size, max length,
   epochs and precision (fp32): bigml finetune task=sft (full; LoRA; full with packing) and TRL's
   SFTTrainer (full; LoRA on the same modules), each in its own process with its peak resident
   memory sampled. Throughput is trained tokens per second: the non-padding tokens of the training
   rows over the training time.
4. Generative accuracy (greedy answers, exact match with the label) of the base and of each bigml
   model, with `bigml eval` on the test file.

torchtune is not measured: its last release (0.6.1) does not import beside torchao 0.18, which bigml
uses (torchao.dtypes.nf4tensor and other names it imports were moved or removed).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, peak_rss, peak_rss_of, table  # noqa: E402

TRL_SCRIPT = textwrap.dedent('''
    import json, sys, tempfile, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from bigml.data.chat import DEFAULT_TEMPLATE

    base, train, mode, bs, max_len, epochs, lr = sys.argv[1:8]
    rows = [json.loads(line) for line in open(train)]
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = DEFAULT_TEMPLATE  # the template bigml renders with: the same tokens
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                            "completion": [[{"role": "assistant", "content": r["completion"]}] for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     per_device_train_batch_size=int(bs), num_train_epochs=int(epochs), learning_rate=float(lr),
                     max_length=int(max_len), packing=False, logging_steps=10**6, save_strategy="no", report_to=[],
                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=lora if mode == "lora" else None)
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * int(epochs)
    t0 = time.perf_counter()
    out = trainer.train()
    dt = time.perf_counter() - t0
    print(json.dumps({"trained_tokens_per_sec": tokens / dt, "train_time_s": dt, "steps": out.global_step,
                      "train_loss": out.training_loss}))
''')


def main() -> None:
    a = parser(__doc__).parse_args()
    from bigml.data.chat import tweet_instructions

    n_train = 120 if a.quick else int(os.environ.get("BENCH_SFT_ROWS", 2400))
    n_test = 40 if a.quick else 400
    steps = 20 if a.quick else int(os.environ.get("BENCH_SFT_PRETRAIN_STEPS", 600))
    bs, max_len, epochs = 16, 96, 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {"BIGML_CACHE_DIR": str(tmp / "cache"), "CI": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        rows = tweet_instructions()
        random.Random(0).shuffle(rows)
        test, val, train = rows[:n_test], rows[n_test:n_test + 100], rows[n_test + 100:n_test + 100 + n_train]
        for name, part in (("train", train), ("val", val), ("test", test)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        # the base: pretrained on tweets that are not in the test file, and on the instruction's words
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": r["prompt"] + " " + r["completion"]}) + "\n"
                                  for r in rows[n_test:]))
        pretrain = ["model=gpt-mini", "data=text", f"data.path={corpus}", "tokenizer.vocab_size=4096",
                    "data.block_size=128", "data.batch_size=16", f"trainer.max_steps={steps}", "optimizer.lr=1e-3",
                    "trainer.val_check_interval=200", "logger=none", f"hydra.run.dir={tmp / 'base'}"]
        wall, _, _ = bigml_cmd("pretrain", *pretrain, env=env)
        base = tmp / "base" / "model"
        files = [f"data.path={tmp / 'train.jsonl'}", f"data.val_path={tmp / 'val.jsonl'}", f"data.test_path={tmp / 'test.jsonl'}"]
        common = ["task=sft", "data=tweet-instructions", f"model.path={base}", *files, f"data.batch_size={bs}",
                  f"data.max_length={max_len}", f"trainer.max_epochs={epochs}", "trainer.precision=32-true",
                  "logger=none", "eval.generate=true", "eval.max_new_tokens=4", "eval.batch_size=64", "callbacks=none"]
        variants = [("bigml full", ["optimizer.lr=1e-3"]),
                    ("bigml LoRA r=16", ["method=lora", "method.rank=16", "method.alpha=32", "method.dropout=0.0",
                                         "method.target_modules=[c_attn,c_proj,c_fc]", "optimizer.lr=3e-3"]),
                    ("bigml full, packed", ["optimizer.lr=1e-3", "sft.packing=true"])]
        results = {}
        for name, extra in variants:
            run = tmp / re.sub(r"\W+", "_", name)
            rss, wall, m = peak_rss_of(["finetune", *common, *extra, f"hydra.run.dir={run}"], env)
            results[name] = (rss, m)
        trl = {}
        for mode, lr in (("full", "1e-3"), ("lora", "3e-3")):
            rss, _, out, _ = peak_rss([sys.executable, "-c", TRL_SCRIPT, str(base), str(tmp / "train.jsonl"), mode,
                                       str(bs), str(max_len), str(epochs), lr], env)
            trl[mode] = (rss, json.loads(out.strip().splitlines()[-1]))
        _, _, _ = bigml_cmd("eval", "task=sft", f"model.path={base}", f"data.path={tmp / 'test.jsonl'}",
                            "eval.generate=true", "eval.max_new_tokens=4", "eval.batch_size=64",
                            f"hydra.run.dir={tmp / 'base-eval'}", env=env)
        base_eval = json.loads((tmp / "base-eval" / "metrics.json").read_text())

    rows_out = []
    trl_full, trl_lora = trl["full"][1]["trained_tokens_per_sec"], trl["lora"][1]["trained_tokens_per_sec"]
    for name, (rss, m) in results.items():
        peer = trl_lora if "LoRA" in name else trl_full
        rows_out.append([name, f"{m['trained_tokens_per_sec']:,.0f}", f"{m['trained_tokens_per_sec'] / peer:.2f}x",
                         f"{rss:,.0f}", f"{m['train_time_s']:.0f}", f"{m['test_loss']:.3f}", f"{m['test_exact_match']:.3f}"])
    for mode, (rss, m) in trl.items():
        rows_out.append([f"TRL SFTTrainer {'full' if mode == 'full' else 'LoRA r=16'}", f"{m['trained_tokens_per_sec']:,.0f}",
                         "1.00x", f"{rss:,.0f}", f"{m['train_time_s']:.0f}", "-", "-"])
    rows_out.append(["base model (before SFT)", "-", "-", "-", "-", f"{base_eval['loss']:.3f}", f"{base_eval['exact_match']:.3f}"])
    full, lora, packed = (results[k][1] for k in ("bigml full", "bigml LoRA r=16", "bigml full, packed"))
    lines = [
        "## Instruction tuning (task=sft): bigml against TRL's SFTTrainer",
        "",
        f"Base: `bigml pretrain` gpt-mini (4 x 256) on the tweet-instruction texts ({steps} steps). Data: "
        f"`data=tweet-instructions`, {len(train):,} training rows, {len(test)} test rows (files written once, the same "
        f"rows for every variant). Batch {bs}, max length {max_len}, {epochs} epoch, fp32, one process each, in this order.",
        "Trained tokens/s: non-padding tokens of the training rows over the training time (TRL: its tokenized rows, the "
        "same template). Exact match: greedy answers of up to 4 tokens against the label, `bigml eval` on the test file.",
        f"Command: `python scripts/bench_sft.py --out BENCH.md` (`make bench BENCH=sft`); machine load {load:.1f} at the start.",
        "",
        table(["variant", "trained tokens/s", "vs TRL (same method)", "peak RSS (MiB)", "train time (s)", "test loss",
               "test exact match"], rows_out),
        "",
        f"**Reading it.** bigml full finetuning trains at {full['trained_tokens_per_sec'] / trl_full:.2f}x TRL's tokens/s "
        f"and LoRA at {lora['trained_tokens_per_sec'] / trl_lora:.2f}x (target: at least 1.0x). "
        f"LoRA's peak memory is {results['bigml LoRA r=16'][0] / results['bigml full'][0]:.2f}x full finetuning's. "
        f"Packing runs at {packed['trained_tokens_per_sec'] / full['trained_tokens_per_sec']:.2f}x the padded batches' "
        f"tokens/s (short rows: most of a padded batch is padding). "
        f"Generative accuracy: the base model answers {base_eval['exact_match']:.1%} of the test prompts exactly, the "
        f"SFT model {full['test_exact_match']:.1%} (LoRA {lora['test_exact_match']:.1%}); the majority label is 42% of the tweets.",
        "torchtune: not measured; torchtune 0.6.1 does not import beside torchao 0.18 (names it imports were moved or removed).",
    ]
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
