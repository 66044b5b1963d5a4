"""`bigml generate`: continue prompts with a causal LM, or fill [MASK] with a masked LM.

Output contract: the text of a single prompt goes to stdout (streamed on a terminal), many prompts
(or several sequences per prompt) go to JSONL (`output=` or stdout); logs and the speed summary go
to stderr. No run directory is kept (bigml/cli.py gives it a scratch one): generate writes only where
`output=` says.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from bigml.errors import ConfigError, DataError, UsageError

log = logging.getLogger("bigml")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI runs generate in a scratch Hydra directory that it removes afterwards (bigml/cli.py)."""
    return _run(cfg)


def _check(cfg: DictConfig) -> None:
    if int(cfg.max_new_tokens) <= 0:
        raise ConfigError("max_new_tokens", f"{cfg.max_new_tokens} must be at least 1")
    for key in ("num_beams", "num_return_sequences", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(key, f"{cfg[key]} must be at least 1")
    if str(cfg.prompt_overflow) not in ("truncate", "error"):
        raise ConfigError("prompt_overflow", f"{cfg.prompt_overflow!r} is not truncate or error")
    if cfg.do_sample and float(cfg.temperature) <= 0:
        raise ConfigError("temperature", f"{cfg.temperature} must be > 0 when sampling", "use do_sample=false for greedy decoding")
    if not 0 < float(cfg.top_p) <= 1:
        raise ConfigError("top_p", f"{cfg.top_p} must be in (0, 1]")
    if float(cfg.repetition_penalty) <= 0:
        raise ConfigError("repetition_penalty", f"{cfg.repetition_penalty} must be > 0 (1.0: no penalty)")
    if cfg.top_k is not None and int(cfg.top_k) < 1:
        raise ConfigError("top_k", f"{cfg.top_k} must be at least 1")
    if not cfg.do_sample and int(cfg.num_return_sequences) > int(cfg.num_beams):
        raise ConfigError("num_return_sequences", f"{cfg.num_return_sequences} greedy sequences would all be the same",
                          "set do_sample=true, or num_beams >= num_return_sequences")


def _stops(cfg: DictConfig) -> list[str]:
    from bigml.generation import unescape

    stop = cfg.stop
    if stop is None:
        return []
    values = list(stop) if isinstance(stop, (list, ListConfig)) else [stop]
    stops = [unescape(str(s)) for s in values]
    if any(s == "" for s in stops):
        raise ConfigError("stop", "an empty stop string would stop before the first token")
    return stops


def _records(cfg: DictConfig) -> tuple[list[dict[str, Any]], bool]:
    """The prompt records, and whether they came as one prompt (text output) rather than a file."""
    from bigml.generation import read_prompts

    field = str(cfg.prompt_field)
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise UsageError("give prompt=... or prompts_file=..., not both")
    if cfg.prompt is not None:
        text = str(cfg.prompt)
        if not text.strip():
            raise UsageError("prompt is empty; give some text: prompt=\"Once upon a time\"")
        return [{field: text}], True
    if cfg.prompts_file is not None:
        return read_prompts(str(cfg.prompts_file), field), False
    try:
        piped = not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        piped = False
    if piped:
        try:
            text = sys.stdin.read()
        except OSError:
            text = ""
        text = text.rstrip("\n")
        if not text.strip():
            raise UsageError("the prompt piped on standard input is empty")
        return [{field: text}], True
    raise UsageError("no prompt: give prompt=\"...\", prompts_file=<file>, or pipe text on standard input")


def _device(cfg: DictConfig) -> str:
    import torch

    device = str(cfg.device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda is not available on this machine", "use device=auto or device=cpu")
    return device


def _run(cfg: DictConfig) -> dict[str, Any]:
    _check(cfg)
    stops = _stops(cfg)
    records, single = _records(cfg)
    field = str(cfg.prompt_field)

    import torch
    import transformers

    from bigml.data.tokenizer import load_tokenizer
    from bigml.generation import resolve_dtype
    from bigml.models.architectures import describe, load_lm, objective_of, read_config

    path = str(cfg.model.path)
    config = read_config(path)
    objective = objective_of(config)
    tokenizer = load_tokenizer(path, key="model.path")
    device = _device(cfg)
    dtype = resolve_dtype(str(cfg.precision), device)
    log.info("loading %s (%s, %s, %s)", path, describe(config), objective, str(dtype).removeprefix("torch."))
    model = load_lm(path, objective).to(device=device, dtype=dtype).eval()
    transformers.set_seed(int(cfg.seed))
    if objective == "masked":
        return _fill_mask(cfg, model, tokenizer, records, single, field)
    return _causal(cfg, model, tokenizer, records, single, field, stops, dtype, torch)


def _writer(cfg: DictConfig):
    if cfg.output is None:
        return sys.stdout, False
    out = Path(str(cfg.output)).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return out.open("w", encoding="utf-8"), True
    except OSError as e:
        raise UsageError(f"output={cfg.output}: cannot write there ({e.strerror})") from None


def _causal(cfg, model, tokenizer, records, single, field, stops, dtype, torch) -> dict[str, Any]:
    from bigml.generation import Generator

    n_seq = int(cfg.num_return_sequences)
    gen_cfg = dict(max_new_tokens=int(cfg.max_new_tokens), do_sample=bool(cfg.do_sample),
                   num_beams=int(cfg.num_beams), length_penalty=float(cfg.length_penalty),
                   num_return_sequences=n_seq, repetition_penalty=float(cfg.repetition_penalty),
                   use_cache=bool(cfg.use_cache))
    if cfg.do_sample:
        gen_cfg.update(temperature=float(cfg.temperature), top_p=float(cfg.top_p))
        if cfg.top_k is not None:
            gen_cfg["top_k"] = int(cfg.top_k)
    if cfg.cache_implementation is not None and cfg.use_cache:
        gen_cfg["cache_implementation"] = str(cfg.cache_implementation)
    gen = Generator(model, tokenizer, gen_cfg, stops, chat=bool(cfg.chat), prompt_overflow=str(cfg.prompt_overflow),
                    compile=bool(cfg.compile))
    text_out = single and n_seq == 1 and cfg.output is None
    stream = str(cfg.stream).lower()
    stream_to = None
    if text_out and (stream == "true" or (stream == "auto" and sys.stdout.isatty())):
        stream_to = sys.stdout
    sink, is_file = (None, False) if text_out else _writer(cfg)
    total_new, total_s, first_token_s, truncated = 0, 0.0, None, []
    bs = int(cfg.batch_size)
    try:
        for start in range(0, len(records), bs):
            chunk = records[start:start + bs]
            batch = gen.generate([r[field] for r in chunk], stream_to=stream_to)
            total_new += sum(sum(c) for c in batch.new_tokens)
            total_s += batch.seconds
            if first_token_s is None:
                first_token_s = batch.first_token_s
            truncated += batch.truncated_tokens
            if text_out:
                if stream_to is None:
                    sys.stdout.write(batch.completions[0][0] + "\n")
                    sys.stdout.flush()
                continue
            for rec, texts, counts, dropped in zip(chunk, batch.completions, batch.new_tokens, batch.truncated_tokens, strict=True):
                for j, (text, n) in enumerate(zip(texts, counts, strict=True)):
                    row = {**rec, "completion": text, "new_tokens": n, "seconds": round(batch.seconds, 4)}
                    if n_seq > 1:
                        row["sequence"] = j
                    if dropped:
                        row["truncated_tokens"] = dropped
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
    finally:
        if is_file:
            sink.close()
    n_trunc = sum(1 for d in truncated if d)
    if n_trunc:
        log.warning("warning: %d of %d prompts were longer than the %d tokens the context leaves beside "
                    "max_new_tokens=%d; their first %d tokens in all were dropped (prompt_overflow=error "
                    "refuses instead)", n_trunc, len(truncated), gen.prompt_budget, gen.max_new_tokens, sum(truncated))
    rate = total_new / total_s if total_s > 0 else float("nan")
    cache = ("no KV cache" if not cfg.use_cache else
             f"{gen.config.cache_implementation or 'dynamic'} KV cache") + (", compiled" if cfg.compile else "")
    ttft = f"{first_token_s * 1000:.0f} ms" if first_token_s is not None else "n/a (beam search)"
    where = f"; wrote {cfg.output}" if is_file else ""
    log.info("generated %d tokens for %d prompt%s in %.2f s: %.1f tokens/s, first token after %s "
             "(%s, %s, batch %d)%s", total_new, len(records), "" if len(records) == 1 else "s", total_s, rate, ttft,
             str(dtype).removeprefix("torch."), cache, bs, where)
    return {"prompts": len(records), "new_tokens": total_new, "seconds": round(total_s, 4),
            "tokens_per_s": round(rate, 2), "first_token_s": first_token_s, "truncated_prompts": n_trunc}


def _fill_mask(cfg, model, tokenizer, records, single, field) -> dict[str, Any]:
    from transformers import pipeline

    mask = tokenizer.mask_token
    if mask is None:
        raise DataError(f"model.path={cfg.model.path}: the tokenizer has no mask token, so it cannot fill masks")
    k = int(cfg.top_k) if cfg.top_k is not None else 5
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device, top_k=k)
    prompts = []
    for i, rec in enumerate(records, 1):
        text = rec[field].replace("[MASK]", mask)
        if not text.strip():
            raise UsageError("prompt is empty; give some text with [MASK] in it")
        if mask not in text:
            where = "prompt" if single else f"prompt {i}"
            raise UsageError(f"{where} has no mask to fill; put [MASK] (or {mask}) where a word should go")
        prompts.append(text)
    t0 = time.perf_counter()
    results = []
    for text in prompts:
        res = fill(text)
        per_mask = res if res and isinstance(res[0], list) else [res]
        results.append([[{"token": r["token_str"].strip(), "score": round(float(r["score"]), 6)} for r in m]
                        for m in per_mask])
    seconds = time.perf_counter() - t0
    if single and cfg.output is None:
        fills = results[0]
        for i, m in enumerate(fills, 1):
            if len(fills) > 1:
                sys.stdout.write(f"{mask} {i}:\n")
            for r in m:
                sys.stdout.write(f"{r['score']:.4f}\t{r['token']}\n")
        sys.stdout.flush()
    else:
        sink, is_file = _writer(cfg)
        try:
            for rec, fills in zip(records, results, strict=True):
                sink.write(json.dumps({**rec, "fills": fills if len(fills) > 1 else fills[0]}, ensure_ascii=False) + "\n")
        finally:
            if is_file:
                sink.close()
    log.info("filled %d prompt%s in %.2f s (top %d)", len(records), "" if len(records) == 1 else "s", seconds, k)
    return {"prompts": len(records), "seconds": round(seconds, 4)}


