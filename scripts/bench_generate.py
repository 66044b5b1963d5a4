"""Decoding speed of `bigml generate`: KV cache, bf16, static cache and torch.compile, on CPU.

    python scripts/bench_generate.py --out section.md      # via `make bench BENCH=generate`

Two randomly initialized GPT-2 models (random weights decode at the same speed as trained ones):
tiny (2 x 128, vocab 8k) and ~30M parameters (6 x 512, vocab 16k), context 1280. One prompt of 32
tokens, greedy, `min_new_tokens` = `max_new_tokens` so every variant decodes the same number of
tokens. One torch thread (bigml generate's default, threads=1) unless a variant says otherwise.
Variants run through bigml's own Generator (the code path of the CLI), interleaved
round by round so that other processes on the shared CPU slow them alike; medians are reported.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import parser, table  # noqa: E402

MODELS = {
    "tiny (gpt2 2x128, 2.4M)": dict(n_layer=2, n_embd=128, n_head=2, vocab_size=8192),
    "30M (gpt2 6x512, 28M)": dict(n_layer=6, n_embd=512, n_head=8, vocab_size=16384),
}
# name -> (dtype, generation settings, compile)
VARIANTS = {
    "fp32, no cache": ("fp32", {"use_cache": False}, False),
    "fp32, dynamic cache": ("fp32", {}, False),
    "bf16, dynamic cache": ("bf16", {}, False),
    "bf16, static cache": ("bf16", {"cache_implementation": "static"}, False),
    "bf16, static cache + compile": ("bf16", {"cache_implementation": "static"}, True),
    "fp32, static cache + compile": ("fp32", {"cache_implementation": "static"}, True),
    "fp32, dynamic cache, 2 threads": ("fp32", {}, False),
}
BASELINE = "fp32, dynamic cache"


def build(shape: dict, dtype: str):
    import torch
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPT2Config(n_positions=1280, bos_token_id=0, eos_token_id=0, **shape)
    model = GPT2LMHeadModel(config).eval().to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  eos_token="t0", pad_token="t0")
    return model, tok


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import torch

    from bigml.generation import Generator
    from bigml.hardware import tune_malloc

    tune_malloc()  # as the CLI does
    quick = args.quick
    lengths = [16, 32] if quick else [256, 1024]
    rounds = 1 if quick else 2  # the first call of an eager variant counts as a round (it has no compile)
    models = dict(list(MODELS.items())[:1]) if quick else MODELS
    prompt = " ".join(f"t{i}" for i in range(5, 37))  # 32 tokens
    rows, checks = [], []
    for mname, shape in models.items():
        built = {d: build(shape, d) for d in ("fp32", "bf16")}
        for n in lengths:
            gens, results = {}, {}
            for vname, (dtype, extra, compile_) in VARIANTS.items():
                # no cache at 1024 tokens on the 30M model: quadratic, minutes per run; measured at 256
                if "no cache" in vname and n >= 1024 and "30M" in mname:
                    continue
                if n >= 1024 and "30M" in mname and vname == "fp32, static cache + compile":  # time: bf16's is there
                    continue
                if "2 threads" in vname and (n >= 1024 or "30M" in mname):  # tells enough on the tiny model, slowly
                    continue
                model, tok = built[dtype]
                cfg = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, **extra}
                gens[vname] = Generator(model, tok, cfg, stops=[], compile=compile_)
            torch._dynamo.reset()  # each group compiles afresh (its static cache has its own length) ...
            torch._dynamo.config.recompile_limit = 64  # ... and never falls back to eager silently
            times = {v: [] for v in gens}
            ttft = {v: [] for v in gens}
            t_compile = {}
            for v, g in gens.items():  # warm-up: compilation, allocator, thread pool
                torch.set_num_threads(2 if "2 threads" in v else 1)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    inputs, _ = g.encode([prompt])
                    results[v] = g.model.generate(**inputs, generation_config=g.config)[0].tolist()
                if VARIANTS[v][2]:  # the second call recompiles once more (dynamo marks changed sizes dynamic)
                    g.generate([prompt])
                t_compile[v] = time.perf_counter() - t0
                if not VARIANTS[v][2]:  # eager: the first call is a measurement like the others
                    times[v].append(t_compile[v])
                    ttft[v].append(float("nan"))
            for r in range(rounds):
                for v, g in gens.items():
                    if not VARIANTS[v][2] and r == rounds - 1 and not quick:
                        continue  # eager variants: their first call was a round
                    torch.set_num_threads(2 if "2 threads" in v else 1)
                    b = g.generate([prompt])
                    times[v].append(b.seconds)
                    ttft[v].append(b.first_token_s or float("nan"))
            base = statistics.median(times[BASELINE])
            for v in gens:
                med = statistics.median(times[v])
                rows.append([mname, n, v, n / med, base / med, statistics.median([t for t in ttft[v] if t == t] or [float("nan")]) * 1000, t_compile[v]])
                checks.append((mname, n, v, results[v]))
            print(f"{mname} {n}: " + ", ".join(f"{v} {n / statistics.median(times[v]):.0f} tok/s" for v in gens),
                  file=sys.stderr, flush=True)

    # correctness: greedy tokens with a cache must equal those without, at the same precision
    agree = []
    for mname in models:
        for n in lengths:
            by = {v: r for (m, k, v, r) in checks if m == mname and k == n}
            for v, r in by.items():
                ref = "fp32, no cache" if VARIANTS[v][0] == "fp32" else "bf16, dynamic cache"
                if ref in by and v != ref:
                    same = r == by[ref]
                    first = next((i for i, (a, b) in enumerate(zip(r, by[ref], strict=False)) if a != b), None)
                    agree.append([mname, n, v, ref, "identical" if same else f"differs from token {first - 32}"])

    out = ["## Generate: decoding speed on CPU", "",
           "`python scripts/bench_generate.py --out section.md` (`make bench BENCH=generate`). Greedy decoding of "
           "one 32-token prompt through bigml's Generator (`bigml generate`'s code path), exactly N new tokens; "
           f"random-init GPT-2 models; {rounds} interleaved rounds (compiled variants after a warm-up call), medians. "
           "Speed-up is against fp32 with the dynamic KV cache (transformers' default) in the same run; "
           "first call is the warm-up call, compilation included. One torch thread unless the variant says 2 "
           "(the machine has 2 cores, shared with other work).", "",
           table(["model", "new tokens", "variant", "tokens/s", "speed-up", "first token ms", "first call s"], rows), "",
           "Greedy tokens, cached vs. reference (fp32 rows against fp32 without the cache; bf16 rows against bf16 "
           "with the dynamic cache):", "",
           table(["model", "new tokens", "variant", "reference", "tokens"], agree), ""]
    args.out.write_text("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
