"""Decoding speed of `bigml generate` against plain transformers fp32 `generate`, on CPU.

    python scripts/bench_generate.py --out section.md      # via `make bench BENCH=generate`

The goal (issue 16): `bigml generate` at 3x the tokens/s of plain transformers fp32 `generate` on a
~135M Llama-family model, batch 1, greedy. SmolLM2-135M cannot be downloaded here, so the model is
a randomly initialized Llama of its shape (30 layers x 576, 9 heads / 3 KV heads, MLP 1536, vocab
49152, tied embeddings, RoPE theta 1e5): a step reads the same bytes whatever the weights' values.
Its tokenizer is a byte-level BPE of 49152 tokens trained on the Python standard library (cached).

Variants run in one process, round-robin, so other jobs on the shared CPU slow them alike:
- plain transformers: `model.generate` on the fp32 model, torch's default threads (one per core),
  and the same with 1 thread (the stronger baseline on a busy machine; the ratio is against the
  faster of the two);
- bigml: `bigml generate`'s own code path (bigml.decode_speed.prepare + bigml.generation.Generator)
  with its defaults (every auto decided as the CLI decides it), and with each option forced.
Quality: greedy token equality against the fp32 reference on the 135M model and on a small Llama
that bigml pretrains here, and the perplexity of held-out text (stdlib test files, which the
pretraining corpus excludes) with each weight format. The limit beside each figure: the memory
bandwidth measured here (one thread streaming a 1 GiB array) divided by the bytes read per token.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
            rms_norm_eps=1e-5)
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
CACHE = Path(os.environ.get("BIGML_CACHE_DIR", "~/.cache/bigml")).expanduser()


def stdlib_text(max_bytes: int, tests: bool = False) -> str:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("test/test_*.py") if tests else (p for p in root.rglob("*.py") if "test" not in p.parts))
    out, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(t)
        n += len(t)
        if n >= max_bytes:
            break
    return "\n".join(out)


def smol_dir(quick: bool) -> Path:
    """The SmolLM2-135M-shaped random Llama and its BPE tokenizer, saved once under the cache."""
    where = CACHE / "bench" / ("smollm2-shape-quick" if quick else "smollm2-135m-shape")
    if (where / "config.json").exists():
        return where
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 4096 if quick else SMOL["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text(2_000_000 if quick else 12_000_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    shape = dict(SMOL, vocab_size=vocab, num_hidden_layers=4 if quick else 30)
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0)
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(tmp)
    fast.save_pretrained(tmp)
    shutil.rmtree(where, ignore_errors=True)
    os.replace(tmp, where)
    return where


def trained_llama(quick: bool) -> Path:
    """A small Llama (4 x 256) pretrained by `bigml pretrain` on the stdlib: the quality reference."""
    where = CACHE / "bench" / ("llama-quality-quick" if quick else "llama-4x256-quality")
    if (where / "model" / "config.json").exists():
        return where / "model"
    steps = 20 if quick else 300
    shutil.rmtree(where, ignore_errors=True)
    # fp32 on one thread: on the busy 2-core machine this ran ~4x faster than bf16-mixed on two
    bigml_cmd("pretrain", "model=llama-tiny", "model.num_layers=4", "model.hidden_size=256", "model.num_heads=4",
              "model.num_kv_heads=2", "model.intermediate_size=768", f"trainer.max_steps={steps}",
              f"trainer.val_check_interval={steps}", "threads=1", "trainer.precision=32-true", "logger=none",
              f"hydra.run.dir={where}")
    return where / "model"


def bandwidth_gbs(seconds: float = 2.0) -> float:
    """Best read bandwidth of one thread over a 1 GiB array (GB/s): what one decoding thread can stream."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.ones(2**28)  # 1 GiB of fp32, far beyond the caches
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    torch.set_num_threads(before)
    return best / 1e9


class Variant:
    """One way of decoding: a model, its settings, and how to call it."""

    def __init__(self, name, model, tok, threads, plan=None, gen_kwargs=None):
        self.name, self.model, self.tok, self.threads, self.plan = name, model, tok, threads, plan
        self.gen_kwargs = gen_kwargs or {}
        self.generator = None
        self.times: list[float] = []
        self.first_s = None

    def run(self, prompts: list[str], new: int) -> list[list[int]]:
        import torch

        from bigml.generation import Generator

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        cfg = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
        if self.plan is None:  # plain transformers: the tokenizer and generate, nothing else
            self.tok.padding_side = "left"
            enc = self.tok(prompts, return_tensors="pt", padding=True)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**enc, **cfg, pad_token_id=self.tok.pad_token_id)
            dt = time.perf_counter() - t0
            ids = out[:, enc["input_ids"].shape[1]:].tolist()
        else:
            if self.generator is None or self.generator.max_new_tokens != new:
                self.generator = Generator(self.model, self.tok, cfg, stops=[], plan=self.plan)
            dt = self.generator.generate(prompts).seconds
            ids = None  # token ids come from a separate greedy check (greedy_ids), not from timed runs
        self.times.append(dt)
        return ids


def plain(model_dir: Path, threads: int | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def bigml_variant(name, model_dir: Path, cache_dir: Path, rows: int, **options):
    """bigml's path: load as the CLI does, then bigml.decode_speed.prepare with these options."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigml.decode_speed import prepare

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    opts = dict(precision="auto", quantize="none", threads="auto", compile="auto") | options
    model, plan = prepare(model, "cpu", opts["precision"], quantize=opts["quantize"], threads=opts["threads"],
                          compile=opts["compile"], rows=rows, cache_dir=str(cache_dir))
    return Variant(name, model, tok, plan.threads, plan=plan)


def greedy_ids(v: Variant, prompts: list[str], new: int) -> list[list[int]]:
    """Greedy continuation token ids (`generate` with the variant's settings), for equality checks."""
    import torch

    from bigml.generation import Generator

    if v.threads is not None:
        torch.set_num_threads(v.threads)
    if v.plan is None:
        v.tok.padding_side = "left"
        enc = v.tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = v.model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=v.tok.pad_token_id)
        ends = {v.tok.eos_token_id, v.tok.pad_token_id}
        rows = out[:, enc["input_ids"].shape[1]:].tolist()
        return [r[:next((i + 1 for i, t in enumerate(r) if t in ends), len(r))] for r in rows]  # as Generator trims
    g = Generator(v.model, v.tok, {"max_new_tokens": new, "do_sample": False}, stops=[], plan=v.plan)
    return g.generate(prompts).token_ids


def agreement(ref: list[list[int]], got: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None) for a, b in zip(ref, got, strict=True)]
    diverged = [f for f in firsts if f is not None]
    tail = f"; the others diverge at token {min(diverged)}-{max(diverged)}" if diverged else ""
    return f"{same}/{len(ref)} identical{tail}"


def perplexity(model, tok, text: str, block: int = 256, max_blocks: int = 24) -> float:
    import torch

    ids = tok(text, return_tensors="pt")["input_ids"][0]
    n = min(len(ids) // block, max_blocks)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n):
            x = ids[i * block:(i + 1) * block][None]
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total += float(loss)
            count += block - 1
    return math.exp(total / count)


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import torch

    from bigml.decode_speed import weight_bytes
    from bigml.hardware import cpu_flags, tune_malloc

    tune_malloc()  # as the CLI does
    quick = args.quick
    new = 16 if quick else 128
    rounds = 1 if quick else 3
    load_start = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    model_dir = smol_dir(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    cache = work / "cache"  # a cold bigml cache: compile times below are cold, then warm
    print(f"model {model_dir}; cold cache {cache}", file=sys.stderr, flush=True)

    # -- batch 1: plain transformers vs bigml, interleaved -------------------------------------
    fp32, tok = plain(model_dir, None)
    variants = [Variant(f"transformers fp32, {cores} threads (torch's default)", fp32, tok, cores),
                Variant("transformers fp32, 1 thread", fp32, tok, 1)]
    t0 = time.perf_counter()
    defaults = bigml_variant("bigml defaults", model_dir, cache, 1)
    decide_s = time.perf_counter() - t0
    variants.append(defaults)
    options = {"bigml precision=bf16": dict(precision="bf16"),
               "bigml precision=bf16 compile=true": dict(precision="bf16", compile=True),
               "bigml quantize=int8 compile=false": dict(quantize="int8", compile=False),
               "bigml quantize=int8 (compile=auto: on)": dict(quantize="int8"),
               "bigml quantize=int4": dict(quantize="int4", compile=False),
               "bigml quantize=int4 compile=true": dict(quantize="int4", compile=True)}
    for name, opts in options.items():
        variants.append(bigml_variant(name, model_dir, cache, 1, **opts))
    first_call = {}
    for v in variants:  # warm-up: compilation (cold cache), thread pools, allocator
        t0 = time.perf_counter()
        v.run([PROMPT], new)
        first_call[v.name] = time.perf_counter() - t0
        v.times.clear()
        print(f"warm-up {v.name}: {first_call[v.name]:.1f} s", file=sys.stderr, flush=True)
    for r in range(rounds):
        for v in variants:
            v.run([PROMPT], new)
        print(f"round {r + 1}: " + ", ".join(f"{v.name} {new / v.times[-1]:.1f}" for v in variants), file=sys.stderr, flush=True)
    bw = bandwidth_gbs()
    load_mid = os.getloadavg()[0]
    rate = {v.name: new / statistics.median(v.times) for v in variants}
    base = max(rate[variants[0].name], rate[variants[1].name])
    rows = []
    for v in variants:
        nbytes = weight_bytes(v.model)
        limit = bw * 1e9 / nbytes
        plan = v.plan
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        how = ("fp32, dynamic cache, eager" if plan is None else
               f"{short[plan.dtype]}{'' if plan.quantize == 'none' else ', ' + plan.quantize + ' weights'}, "
               f"{'static cache, compiled' if plan.compile else 'dynamic cache, eager'}")
        rows.append([v.name, how, v.threads, f"{rate[v.name]:.1f}", f"{rate[v.name] / base:.2f}x",
                     f"{nbytes / 1e6:.0f}", f"{limit:.0f}", f"{rate[v.name] / limit:.0%}", f"{first_call[v.name]:.1f}"])

    # -- greedy equality against the fp32 reference ---------------------------------------------
    prompts = [PROMPT, "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n"]
    ref = greedy_ids(variants[1], prompts, 32)
    agree_rows = [["135M shape (random weights)", v.name, agreement(ref, greedy_ids(v, prompts, 32))] for v in variants[2:]]

    # -- quality on a trained model: greedy equality and held-out perplexity ---------------------
    small = trained_llama(quick)
    held_out = stdlib_text(300_000, tests=True)
    q_variants = {"fp32 (reference)": dict(precision="fp32", threads=1, compile=False),
                  "bf16": dict(precision="bf16", threads=1, compile=False),
                  "int8 weights": dict(quantize="int8", threads=1, compile=False),
                  "int4 weights": dict(quantize="int4", threads=1, compile=False)}
    q_rows, q_ref, ppl_ref = [], None, None
    for name, opts in q_variants.items():
        v = bigml_variant(name, small, cache, 1, **opts)
        ids = greedy_ids(v, prompts, 64)
        ppl = perplexity(v.model, v.tok, held_out, max_blocks=4 if quick else 24)
        q_ref = q_ref or ids
        ppl_ref = ppl_ref or ppl
        q_rows.append(["llama 4x256 (bigml pretrain)", name, agreement(q_ref, ids), f"{ppl:.3f}", f"{(ppl / ppl_ref - 1):+.2%}"])
        del v

    # -- a profile of bigml's default decoding step -----------------------------------------------
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(defaults.threads or 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        defaults.run([PROMPT], new)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in ops)
    mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    mm_gbs = weight_bytes(defaults.model) * new / (mm / 1e6) / 1e9 if mm else float("nan")
    prof_rows = [[e.key, f"{e.self_cpu_time_total / total_us:.1%}", e.count // (new + 1)] for e in ops[:6]]
    del defaults.times[-1]

    # -- batched throughput: a prompts file of 8 and 32 prompts, batch_size 8 ---------------------
    file_prompts = [p.strip() + "\n" for p in stdlib_text(200_000).split("\ndef ")[1:33]]
    file_prompts = ["def " + p[:200] for p in file_prompts]
    batch_rows = []
    batched = [variants[0], variants[1]]
    for n in (8, 32):
        b_defaults = bigml_variant("bigml defaults", model_dir, cache, min(8, n))
        b_int4 = bigml_variant("bigml quantize=int4", model_dir, cache, min(8, n), quantize="int4")
        group = [*batched, b_defaults, b_int4]
        for v in group:
            v.times.clear()
        for _ in range(1 if quick or n == 32 else 2):
            for v in group:
                total = 0.0
                for s in range(0, n, 8):
                    v.run(file_prompts[s:s + 8], new)
                    total += v.times.pop()
                v.times.append(total)
        rates = {v.name: n * new / statistics.median(v.times) for v in group}
        b_base = max(rates[group[0].name], rates[group[1].name])
        for v in group:
            batch_rows.append([n, v.name, v.threads, f"{rates[v.name]:.1f}", f"{rates[v.name] / b_base:.2f}x"])
        del b_defaults, b_int4

    # -- the CLI end to end: first-call latency, compile cold vs warm -----------------------------
    cli_cache = work / "cli-cache"
    cli_rows = []
    env = {"BIGML_CACHE_DIR": str(cli_cache), "HF_HUB_OFFLINE": "1"}
    long = 512
    for label, extra in [("defaults, one prompt", [f"max_new_tokens={new}"]),
                         ("quantize=int4 compile=true (cold compile cache)", ["quantize=int4", "compile=true", f"max_new_tokens={new}"]),
                         ("quantize=int4 compile=true (warm compile cache)", ["quantize=int4", "compile=true", f"max_new_tokens={new}"]),
                         (f"quantize=int4 compile=true, {long} new tokens (warm)", ["quantize=int4", "compile=true", f"max_new_tokens={long}"]),
                         (f"quantize=int4, {long} new tokens (compile=auto: eager)", ["quantize=int4", f"max_new_tokens={long}"])]:
        wall, out, err = bigml_cmd("generate", f"model.path={model_dir}", f"prompt={PROMPT}", "stream=false", *extra, env=env)
        speed = next((line.split("speed: ", 1)[1] for line in err.splitlines() if "speed: " in line), "")
        summary = next((line for line in err.splitlines() if "tokens/s" in line), "")
        tps = summary.split(" tokens/s")[0].rsplit(" ", 1)[-1] if summary else "?"
        compile_reason = next((p.split("compile ", 1)[1] for p in speed.split(" | ") if p.startswith("compile ")), "")
        cli_rows.append([label, f"{wall:.1f}", tps, compile_reason])
        print(f"cli {label}: {wall:.1f} s, {tps} tokens/s", file=sys.stderr, flush=True)
    load_end = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)

    native = "AMX" if "amx_bf16" in cpu_flags() else "AVX512-BF16 (no AMX)" if "avx512_bf16" in cpu_flags() else "no native bf16"
    best = max((r for r in rows if r[0].startswith("bigml")), key=lambda r: float(r[3]))
    d = defaults.plan
    out = ["## Generate: decoding speed on CPU", "",
           "`python scripts/bench_generate.py --out section.md` (`make bench BENCH=generate`). Goal (issue 16): "
           "`bigml generate` at 3x the tokens/s of plain transformers fp32 `generate` on a ~135M Llama-family model, "
           f"batch 1, greedy. Model: a random-weight Llama of SmolLM2-135M's shape (30 x 576, 9/3 heads, vocab 49152, "
           f"tied; {sum(p.numel() for p in fp32.parameters()) / 1e6:.0f}M parameters; decoding speed does not depend "
           f"on the weights' values); BPE tokenizer trained on the stdlib. One {len(tok(PROMPT)['input_ids'])}-token prompt, exactly "
           f"{new} new tokens, {rounds} interleaved rounds after a warm-up call, medians. CPU: {native}, {cores} cores. "
           f"Load average (other jobs on the machine) {load_start:.1f} at the start, {load_mid:.1f} after the batch-1 "
           f"rounds, {load_end:.1f} at the end: every variant shared the cores with that load, which slows all of them, "
           "multi-threaded ones most.", "",
           f"Memory bandwidth, one thread streaming 1 GiB: **{bw:.1f} GB/s**. Limit = that bandwidth / the weight "
           "bytes a step reads (the KV cache and activations add a little). Speed-up: against the faster of the two "
           "plain transformers rows, in the same run.", "",
           table(["variant", "runs as", "threads", "tokens/s", "speed-up", "MB read/token", "limit tokens/s",
                  "of limit", "first call s"], rows), "",
           f"Best bigml row: **{best[0]}, {best[4]} plain transformers** ({best[3]} tokens/s). bigml's defaults "
           f"decided (on this machine, in this run, in {decide_s:.1f} s including loading): "
           + "; ".join(f"{k}: {v}" for k, v in d.reasons.items()) + ".", "",
           f"Profile of the defaults' {new}-token decode (torch.profiler, self CPU time): the matrix products take "
           f"{mm / total_us:.0%} and stream the weights at {mm_gbs:.1f} GB/s, {mm_gbs / bw:.0%} of the measured "
           "bandwidth; the rest is the step's other operators and Python.", "",
           table(["operator", "share of self time", "calls per step"], prof_rows), "",
           "Greedy tokens against the fp32 reference (transformers fp32, the same prompts, 32 new tokens):", "",
           table(["model", "variant", "greedy continuations"], agree_rows), "",
           "Quality on a trained model: a Llama 4 x 256 pretrained by `bigml pretrain` (300 steps on the stdlib), "
           "greedy continuations of 4 prompts (64 tokens) against its fp32 run, and perplexity of held-out text "
           "(stdlib test files, excluded from the pretraining corpus), blocks of 256 tokens:", "",
           table(["model", "weights", "greedy continuations", "held-out perplexity", "change"], q_rows), "",
           f"Batched throughput: a prompts file of 8 and 32 prompts (function definitions from the stdlib, "
           f"left-padded), batch_size 8, {new} new tokens each; tokens/s over all prompts:", "",
           table(["prompts", "variant", "threads", "tokens/s", "speed-up"], batch_rows), "",
           "The CLI end to end (`bigml generate model.path=<135M dir> prompt=...`, one after another on a fresh cache "
           "directory): wall time of the whole command (start-up, loading, decisions, compile) and the tokens/s it "
           "reports:", "",
           table(["call", "wall s", "tokens/s", "compile decision"], cli_rows), ""]
    args.out.write_text("\n".join(out))
    json.dump({"rows": rows, "bandwidth": bw}, sys.stderr, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
