"""Training speed: bigml against a plain PyTorch loop (framework overhead) and against the peers.

All variants train the same GPT-2 shape (4 layers x 256, vocab 8192, batch 16 x 256 tokens, the
shape the peers were measured on in DESIGN.md) on the same packed corpus (the Python standard
library), with the same optimizer (AdamW, lr 1e-3, cosine, clipping 1.0), in separate processes,
interleaved round by round so that machine noise hits every variant alike. Tokens/s excludes the
first steps (allocator warm-up, torch.compile) and validation.

    python scripts/bench_pretrain.py --out section.md            # via `make bench BENCH=pretrain`
    python scripts/bench_pretrain.py --variant plain-bf16 --steps 30   # one variant, prints tokens/s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, bigml_cmd, parser, table, timeit  # noqa: E402

SHAPE = ["model=gpt-mini", "tokenizer.vocab_size=8192", "data.block_size=256", "data.batch_size=16",
         "optimizer.lr=1e-3", "trainer.gradient_clip_val=1.0"]
WARMUP = 5


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def _data_and_model(precision: str):
    """The exact tokenizer, packed corpus and model bigml builds for SHAPE."""
    from bigml.commands.pretrain import prepare
    from bigml.models.loading import build_model

    cfg = _compose(SHAPE)
    task, tokenizer, info, hf_config = prepare(cfg)
    model = build_model(hf_config, task)
    return cfg, info, model


def plain_loop(steps: int, precision: str, compile_: bool) -> float:
    """A hand-written loop: what bigml's Lightning machinery is measured against."""
    import torch
    from torch.utils.data import DataLoader

    from bigml.data.packed import PackedBlocks
    from bigml.hardware import tune_malloc
    from bigml.training.optim import build_optimizer, build_scheduler

    tune_malloc()  # what the bigml CLI does at start-up: the ratio then measures the framework alone
    torch.manual_seed(0)
    cfg, info, model = _data_and_model(precision)
    if compile_:
        model.compile()
    blocks = PackedBlocks(info, 0, info.n_train, 256)
    loader = DataLoader(blocks, batch_size=16, shuffle=True, drop_last=True)
    from omegaconf import OmegaConf

    opt = build_optimizer(OmegaConf.to_container(cfg.optimizer), model)
    sched = build_scheduler(cfg.scheduler, opt, steps)
    bf16 = precision == "bf16"
    it = iter(loader)
    t0 = None
    for step in range(steps):
        if step == WARMUP:
            t0 = time.perf_counter()
        train_step(model, next(it), opt, bf16)
        sched.step()
    return (steps - WARMUP) * 16 * 256 / (time.perf_counter() - t0)


def train_step(model, batch, opt, bf16: bool) -> None:
    """One optimizer step of the hand-written loop (also what the profile measures)."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def causal_loss(model, batch):
    """The loss bigml's pretraining computes (the causal-LM task's: fused projection + cross-entropy
    where it applies), so the plain loop differs from bigml by the framework alone."""
    from bigml.tasks import get_task

    return get_task("causal_lm").training_loss(model, batch, batch)


def loss_steps(precision: str, repeats: int = 6) -> list[list]:
    """Forward + backward of SHAPE's model on one batch: transformers' loss (full logits) against
    bigml's fused projection + cross-entropy, interleaved, median ms."""
    import torch

    from bigml.models.fused_loss import causal_lm_loss

    torch.manual_seed(0)
    _, _, model = _data_and_model(precision)
    batch = torch.randint(0, model.config.vocab_size, (16, 256))
    kinds = {"transformers (logits over the vocabulary, then cross-entropy)": lambda: model(input_ids=batch, labels=batch).loss,
             "bigml fused projection + cross-entropy": lambda: causal_lm_loss(model, batch)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, fn in kinds.items():
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            times[k].append(time.perf_counter() - t)
    first = statistics.median(next(iter(times.values())))
    return [[k, f"{statistics.median(v) * 1e3:.0f}", f"{first / statistics.median(v):.2f}x"] for k, v in times.items()]


def hf_trainer(steps: int, precision: str, compile_: bool) -> float:
    """The Hugging Face Trainer as its run_clm example drives it, on the same blocks."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bigml.data.packed import PackedBlocks

    torch.manual_seed(0)
    cfg, info, model = _data_and_model(precision)
    blocks = PackedBlocks(info, 0, info.n_train, 256)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = blocks[i]
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARMUP and self.t0 is None:
                self.t0 = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-3,
            lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
            bf16=precision == "bf16", use_cpu=True, logging_steps=10, save_strategy="no", report_to=[],
            dataloader_num_workers=0, torch_compile=compile_, disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock]).train()
    return (steps - WARMUP) * 16 * 256 / (time.perf_counter() - clock.t0)


def bigml_run(steps: int, precision: str, compile_: bool) -> float:
    prec = {"fp32": "32-true", "bf16": "bf16-mixed", "auto": "auto"}[precision]
    with tempfile.TemporaryDirectory() as tmp:
        compile_arg = [] if compile_ is None else [f"trainer.compile={str(compile_).lower()}"]  # None: the default
        bigml_cmd("pretrain", *SHAPE, f"trainer.max_steps={steps}", f"trainer.precision={prec}",
                  *compile_arg, "trainer.val_check_interval=100000",
                  "trainer.limit_val_batches=2", "checkpoint.every_n_steps=100000", "logger=none",
                  f"hydra.run.dir={tmp}/run")
        m = json.loads(Path(tmp, "run", "metrics.json").read_text())
    # bigml's meter skips 3 warm-up steps; re-weight to the same WARMUP as the other variants is
    # unnecessary for steady-state rates, so its own figure is used.
    return float(m["tokens_per_sec"])


DROPOUT_SHAPE = ["model=bert-small", "data.block_size=128", "data.batch_size=16"]


def dropout_masks(rounds: int, steps: int) -> tuple[list[list], list[list]]:
    """BERT-small pretraining (dropout 0.1) with each kind of dropout mask, interleaved rounds; and
    one mask over a 16 x 8 x 128 x 128 attention-probability tensor, torch's vs the hash."""
    import torch

    from bigml.models.fast_dropout import hash_dropout

    tps: dict[str, list[float]] = {"hash": [], "torch": []}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for kind in tps:
            with tempfile.TemporaryDirectory() as tmp:
                bigml_cmd("pretrain", *DROPOUT_SHAPE, f"trainer.max_steps={steps}", f"trainer.dropout_masks={kind}",
                          f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=4",
                          "checkpoint.every_n_steps=100000", "logger=none", f"hydra.run.dir={tmp}/run")
                m = json.loads(Path(tmp, "run", "metrics.json").read_text())
            tps[kind].append(float(m["tokens_per_sec"]))
            losses[kind] = float(m["val_loss"])
    x = torch.randn(16, 8, 128, 128)
    call = {"torch": lambda: torch.nn.functional.dropout(x, 0.1, True), "hash": lambda: hash_dropout(x, 0.1)}
    ms = {k: timeit(f, repeat=20, warmup=3)[0] * 1e3 for k, f in call.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    runs = [[f"`bigml pretrain <bert> trainer.dropout_masks={k}`", f"{med[k]:.0f}", f"{med[k] / med['torch']:.2f}x",
             f"{losses[k]:.3f}"] for k in ("torch", "hash")]
    one = [[k, f"{ms[k]:.2f}", f"{ms['torch'] / ms[k]:.1f}x"] for k in ("torch", "hash")]
    return runs, one


def litgpt_run(steps: int, precision: str, compile_: bool) -> float:
    """`litgpt pretrain` (always compiled) on the same shape, through scripts/peer_litgpt.py."""
    prec = {"fp32": "32-true", "bf16": "bf16-mixed"}[precision]
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("peer_litgpt.py")), "--precision", prec,
                        "--steps", str(steps)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"litgpt failed:\n{p.stderr[-3000:]}")
    return float(p.stdout.strip().splitlines()[-1])


def optimizer_steps(repeats: int = 20) -> list[list]:
    """AdamW's step on SHAPE's parameters: torch's three implementations side by side (the per-tensor
    loop, foreach, fused), interleaved, median seconds per step; gradients are random, the same for all."""
    import torch

    torch.manual_seed(0)
    _, _, model = _data_and_model("fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"per-tensor loop (foreach=False)": {"foreach": False}, "foreach": {"foreach": True},
             "fused (bigml's default)": {"fused": True}}
    opts = {k: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **kw) for k, kw in kinds.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t)
    loop = statistics.median(times["per-tensor loop (foreach=False)"])
    return [[k, f"{statistics.median(v) * 1e3:.2f}", f"{loop / statistics.median(v):.2f}x"] for k, v in times.items()]


def profile_step(precision: str, steps: int = 6, top: int = 10) -> list[list]:
    """Where a step's time goes: torch.profiler over the plain loop's steps (after warm-up) at the
    precision bigml's default resolves to; operators by their own CPU time, as shares of the total."""
    import torch
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.data import DataLoader

    from bigml.data.packed import PackedBlocks
    from bigml.training.optim import build_optimizer

    torch.manual_seed(0)
    cfg, info, model = _data_and_model(precision)
    loader = iter(DataLoader(PackedBlocks(info, 0, info.n_train, 256), batch_size=16, shuffle=True, drop_last=True))
    opt = build_optimizer(OmegaConf.to_container(cfg.optimizer), model)
    bf16 = precision == "bf16"

    for _ in range(3):
        train_step(model, next(loader), opt, bf16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, next(loader), opt, bf16)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, e.count // steps, f"{100 * e.self_cpu_time_total / total:.1f}%"] for e in events[:top]]


def litgpt_available() -> bool:
    """LitGPT lives in its own venv (`make bench-peers`); its absence is reported, not hidden."""
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("peer_litgpt.py")), "--check"],
                       capture_output=True, text=True)
    return p.returncode == 0


RUNNERS = {"plain": plain_loop, "hf": hf_trainer, "bigml": bigml_run, "litgpt": litgpt_run}
VARIANTS = [  # name, runner, precision, compile
    ("plain-fp32", "plain", "fp32", False), ("bigml-fp32", "bigml", "fp32", False),
    ("plain-bf16", "plain", "bf16", False), ("bigml-bf16", "bigml", "bf16", False),
    ("plain-fp32-compile", "plain", "fp32", True), ("bigml-fp32-compile", "bigml", "fp32", True),
    ("plain-bf16-compile", "plain", "bf16", True), ("bigml-bf16-compile", "bigml", "bf16", True),
    ("hf-fp32", "hf", "fp32", False), ("hf-bf16", "hf", "bf16", False),
    ("bigml-default", "bigml", "auto", None),
    ("litgpt-fp32", "litgpt", "fp32", True), ("litgpt-bf16", "litgpt", "bf16", True),
]


def run_variant(name: str, steps: int) -> float:
    """Each variant in its own process (fresh allocator, threads, compile caches)."""
    p = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(steps), "--out", os.devnull],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    return float(p.stdout.strip().splitlines()[-1])


def run_json(variant: str) -> str:
    p = subprocess.run([sys.executable, __file__, "--variant", variant, "--out", os.devnull], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{p.stderr[-3000:]}")
    return p.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--variant")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.variant == "optimizer":
        print(json.dumps(optimizer_steps()))
        return
    if a.variant == "dropout":
        print(json.dumps(dropout_masks(1 if a.quick else 3, 10 if a.quick else 40)))
        return
    if a.variant and a.variant.startswith("loss-"):
        print(json.dumps(loss_steps(a.variant.removeprefix("loss-"))))
        return
    if a.variant and a.variant.startswith("profile-"):
        print(json.dumps(profile_step(a.variant.removeprefix("profile-"))))
        return
    if a.variant:
        _, runner, precision, compile_ = next(v for v in VARIANTS if v[0] == a.variant)
        print(RUNNERS[runner](a.steps, precision, compile_))
        return
    steps, rounds = (12, 1) if a.quick else (a.steps, a.rounds)
    variants = [v for v in VARIANTS if v[1] != "litgpt" or (litgpt_available() and not a.quick)]
    has_litgpt = any(v[1] == "litgpt" for v in variants)
    run_variant("plain-fp32", 6)  # fills the tokenizer and corpus caches outside the timings
    results: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(rounds):
        for name, *_ in variants:
            results[name].append(run_variant(name, steps))
            print(f"{name}: {results[name][-1]:.0f} tok/s", flush=True)
    tps = {k: statistics.median(v) for k, v in results.items()}
    opt_rows = json.loads(run_json("optimizer"))
    from bigml.hardware import resolve_precision

    default_precision = "bf16" if resolve_precision("auto", "cpu") == "bf16-mixed" else "fp32"
    prof_rows = json.loads(run_json(f"profile-{default_precision}"))
    loss_rows = json.loads(run_json(f"loss-{default_precision}"))
    mask_runs, mask_one = json.loads(run_json("dropout"))

    def command(runner: str, precision: str, c: bool | None) -> str:
        if runner == "bigml":
            prec = {"auto": "auto", "fp32": "32-true", "bf16": "bf16-mixed"}[precision]
            return f"`bigml pretrain <shape> trainer.precision={prec}" + ("`" if c is None else f" trainer.compile={str(c).lower()}`")
        return {"plain": "hand-written loop (`--variant plain-*`)",
                "hf": "transformers Trainer, run_clm-style arguments (`--variant hf-*`)",
                "litgpt": "`litgpt pretrain` (scripts/peer_litgpt.py)"}[runner]

    rows = [[name, command(runner, precision, c), precision, {None: "default", True: "yes", False: "no"}[c], tps[name]]
            for name, runner, precision, c in variants]
    overhead = [[p, tps[f"plain-{p}"] / tps[f"bigml-{p}"]] for p in ("fp32", "fp32-compile", "bf16", "bf16-compile")]
    hf_best = max(tps["hf-fp32"], tps["hf-bf16"])
    default = tps["bigml-default"]
    if has_litgpt:
        lit_best = max(tps["litgpt-fp32"], tps["litgpt-bf16"])
        litgpt_line = (f"LitGPT's best here: {lit_best:.0f} tokens/s, so bigml's default runs at "
                       f"**{default / lit_best:.2f}x LitGPT** (target, issue 16: at least 1.3x).")
    else:
        litgpt_line = ("LitGPT was not measured in this run: it needs its own environment "
                       "(`make bench-peers`, see scripts/peer_litgpt.py).")
    text = f"""## Pretraining speed: framework overhead and peers

Model: GPT-2 shape, 4 layers x 256 hidden, vocab 8192 (5.4M parameters); batch 16 x 256 tokens;
AdamW lr 1e-3, cosine, clip 1.0; corpus: the Python standard library, packed. {steps} steps per
run, tokens/s after the first {WARMUP} (bigml: 3) steps, median of {rounds} interleaved rounds, each
run in its own process. `<shape>` = `{' '.join(SHAPE)}`.
Full run: `python scripts/bench_pretrain.py --out BENCH.md` (`make bench BENCH=pretrain`).

{table(["variant", "command", "precision", "compile", "tokens/s"], rows)}

**Framework overhead** (plain loop tokens/s / bigml tokens/s, same model, data, optimizer, precision
and threads; target at most 1.05):

{table(["precision", "ratio"], overhead)}

**Against the peers:** bigml's default settings (`bigml pretrain <shape>`: precision auto, compile
default) run at {default:.0f} tokens/s = **{default / hf_best:.2f}x** the HF Trainer's best
({hf_best:.0f} tokens/s; target at least 1.8x) on the same machine in the same run. {litgpt_line}
torch.compile in this run: bigml fp32 {tps["bigml-fp32-compile"] / tps["bigml-fp32"]:.2f}x, bf16
{tps["bigml-bf16-compile"] / tps["bigml-bf16"]:.2f}x its eager tokens/s (steady state, compile time excluded).

**Loss** (`--variant loss-{default_precision}`): forward + backward of the model on one 16 x 256 batch at
{default_precision}, transformers' loss against bigml's fused projection + cross-entropy (bigml.models.fused_loss;
the plain loop above uses bigml's, so its ratio measures the framework alone), interleaved, median of 6:

{table(["loss", "ms per forward + backward", "speed-up"], loss_rows)}

**Optimizer step** (`--variant optimizer`): AdamW over the model's 5.4M parameters, torch's three
implementations, interleaved, median of 20 steps each:

{table(["implementation", "ms per step", "speed-up over the loop"], opt_rows)}

**Dropout masks** (`--variant dropout`): BERT pretraining keeps dropout 0.1 (the GPT shape above has none).
`<bert>` = `{' '.join(DROPOUT_SHAPE)}`, precision auto, tokens/s as above, median of
{1 if a.quick else 3} interleaved runs; val loss after the last of them (different masks, the same training):

{table(["command", "tokens/s", "vs torch masks", "val loss"], mask_runs)}

One mask over 16 x 8 x 128 x 128 attention probabilities, p = 0.1, median of 20 (bigml.models.fast_dropout
explains why torch's CPU masks are slow: its generator is sequential):

{table(["masks", "ms per call", "speed-up"], mask_one)}

**Where a step's time goes** (`--variant profile-{default_precision}`: torch.profiler over 6 steps of the
hand-written loop at the precision `auto` picks here, {default_precision}; operators by their own CPU time):

{table(["operator", "calls per step", "share of CPU time"], prof_rows)}
"""
    a.out.write_text(text)


if __name__ == "__main__":
    main()
