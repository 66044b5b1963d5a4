"""Decoding with transformers' `generate`, measured: the pieces of `bigml generate`.

Everything that decides *which* token comes next is transformers' (GenerationConfig: greedy,
sampling, beam search, repetition penalty, stop strings, KV caches, compile). This module only
prepares the prompts (chat template, left padding, truncation to the context), times the run
(a streamer sees the first new token), trims stop strings, and streams text to a terminal.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from bigml.errors import ConfigError, DataError, UsageError
from bigml.progress import track

log = logging.getLogger("bigml")


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\\` as typed in a shell become the characters (for stop strings)."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r").replace("\0", "\\")


def early_stops(tokenizer, stops: list[str]) -> list[str]:
    """The stop strings transformers can watch for while decoding (it then stops early). It refuses a
    string none of whose characters any token contains (a ValueError for the whole call); such a
    string can still appear in decoded text, so `cut_at_stop` still cuts at it afterwards."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    usable = []
    for s in stops:
        try:
            StopStringCriteria(tokenizer, [s])
            usable.append(s)
        except ValueError:
            log.debug("stop string %r matches no token; cut after decoding only", s)
    return usable


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TimingStreamer(BaseStreamer):
    """Receives tokens from `generate` as they are produced: records when the first new token came
    and, for a terminal, prints the text (held back while it could be the start of a stop string)."""

    def __init__(self, tokenizer=None, out: TextIO | None = None, stops: list[str] | None = None):
        self.tokenizer, self.out, self.stops = tokenizer, out, stops or []
        self.first_token_at: float | None = None
        self._seen_prompt = False
        self._ids: list[int] = []
        self._printed = 0
        self._stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # the first call carries the prompt
            self._seen_prompt = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.out is not None:
            self._ids.extend(value.reshape(-1).tolist())
            self._print(final=False)

    def end(self) -> None:
        if self.out is not None:
            self._print(final=True)

    def _print(self, final: bool) -> None:
        if self._stopped:
            return
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        text, self._stopped = cut_at_stop(text, self.stops)
        if not final and not self._stopped:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character
        if len(text) > self._printed:
            self.out.write(text[self._printed:])
            self.out.flush()
            self._printed = len(text)


@dataclass
class Batch:
    """The results of one `generate` call: completions[i][j] is sequence j of prompt i."""

    completions: list[list[str]]
    new_tokens: list[list[int]]
    seconds: float
    first_token_s: float | None
    truncated_tokens: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)  # the new tokens of each output row, end token included


class Generator:
    """A causal LM and its tokenizer, ready to decode batches of prompts."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gen_cfg: dict[str, Any],
                 stops: list[str], chat: bool = False, prompt_overflow: str = "truncate", compile: bool = False,
                 plan=None):
        """`plan` (bigml.decode_speed.prepare's): compile as it decided, with Inductor's caches in
        bigml's cache directory; `compile=true` without a plan compiles with torch's default cache."""
        self.model, self.tokenizer, self.stops, self.chat = model, tokenizer, stops, chat
        self.plan = plan
        compile = bool(compile or (plan is not None and plan.compile))
        self.compiled = compile
        self.prompt_overflow = prompt_overflow
        tokenizer.padding_side = "left"  # decoder-only models continue from the last position
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if chat and not getattr(tokenizer, "chat_template", None):
            raise UsageError("chat=true: this tokenizer has no chat template; drop chat=true, or use a chat model")
        self.max_new_tokens = int(gen_cfg["max_new_tokens"])
        ctx = context_length(model.config)
        if ctx is not None and self.max_new_tokens >= ctx:
            raise ConfigError("max_new_tokens", f"{self.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {ctx} tokens", f"use at most {ctx - 1}")
        self.prompt_budget = ctx - self.max_new_tokens if ctx is not None else None
        # start from the model's own generation defaults (eos, bos), then apply ours
        base = model.generation_config.to_dict() if getattr(model, "generation_config", None) else {}
        for k in ("max_length", "min_length"):
            base.pop(k, None)
        config = GenerationConfig(**{**base, **gen_cfg})
        config.pad_token_id = tokenizer.pad_token_id
        if config.eos_token_id is None and tokenizer.eos_token_id is not None:
            config.eos_token_id = tokenizer.eos_token_id
        if stops:
            config.stop_strings = early_stops(tokenizer, stops) or None
        if compile:
            from transformers import CompileConfig

            config.cache_implementation = config.cache_implementation or "static"
            # fullgraph: a graph break in the decoding step would bring back the Python overhead
            # compiling removes; dynamic=False: the static cache gives every step the same shapes
            compile_config = CompileConfig(fullgraph=True, dynamic=False,
                                           mode="default" if model.device.type == "cpu" else "reduce-overhead")
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
            config.compile_config = compile_config
        try:
            config.validate(strict=True)
        except ValueError as e:
            raise UsageError(f"decoding settings: {str(e).splitlines()[0]}") from None
        self.config = config

    STATIC_CACHE_STEP = 256

    def static_cache_length(self, prompt_len: int) -> int:
        """The static KV cache's length for a batch: prompt + new tokens, rounded up to a multiple of
        STATIC_CACHE_STEP so that batches of similar lengths share one compiled graph (transformers
        keeps the longest seen), capped at the context. Every step attends over the whole static
        cache, so it is not simply the context: 8192 positions would read ~190 MB of keys and
        values per step on SmolLM2-135M, more than its bf16 weights' 270 MB."""
        need = prompt_len + self.max_new_tokens
        length = -(-need // self.STATIC_CACHE_STEP) * self.STATIC_CACHE_STEP
        ctx = context_length(self.model.config)
        return min(length, ctx) if ctx is not None else length

    def encode(self, prompts: list[str] | list[list[dict]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Left-padded input ids; prompts over the budget lose tokens from the left (or fail). With
        chat=true a prompt is a user turn, or a whole conversation (a list of {role, content})."""
        if self.chat:
            prompts = [self.tokenizer.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                                          tokenize=False, add_generation_prompt=True) for p in prompts]
        ids = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        dropped = []
        for i, seq in enumerate(ids):
            over = len(seq) - self.prompt_budget if self.prompt_budget is not None else 0
            if over > 0 and self.prompt_overflow == "error":
                raise UsageError(f"prompt {i + 1} has {len(seq)} tokens; with max_new_tokens={self.max_new_tokens} "
                                 f"the model's context leaves room for {self.prompt_budget}; shorten it, lower "
                                 f"max_new_tokens, or set prompt_overflow=truncate")
            dropped.append(max(over, 0))
            if over > 0:
                ids[i] = seq[over:]
        if any(len(seq) == 0 for seq in ids):
            raise UsageError("a prompt is empty after tokenization; give some text")
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in batch.items()}, dropped

    @torch.inference_mode()
    def generate(self, prompts: list[str] | list[list[dict]], stream_to: TextIO | None = None) -> Batch:
        inputs, dropped = self.encode(prompts)
        n_seq = int(self.config.num_return_sequences or 1)
        streams = stream_to is not None and len(prompts) == 1 and n_seq == 1 and self.config.num_beams == 1
        timer = TimingStreamer(self.tokenizer, stream_to if streams else None, self.stops)
        beams = int(self.config.num_beams or 1) > 1  # transformers refuses streamers with beam search
        config = self.config
        if config.cache_implementation == "static":
            config = copy.copy(config)  # shallow: the compile config (and its compiled graph) is shared
            config.max_cache_len = self.static_cache_length(inputs["input_ids"].shape[1])
        from bigml.decode_speed import inductor_cache

        cache_dir = self.plan.compile_cache_dir if self.plan is not None and self.compiled else None
        t0 = time.perf_counter()
        with inductor_cache(cache_dir):
            out = self.model.generate(**inputs, generation_config=config, tokenizer=self.tokenizer,
                                      streamer=None if beams else timer)
        seconds = time.perf_counter() - t0
        if streams:
            stream_to.write("\n")
            stream_to.flush()
        prompt_len = inputs["input_ids"].shape[1]
        new = out[:, prompt_len:]
        ends = set(self.config.eos_token_id if isinstance(self.config.eos_token_id, list) else [self.config.eos_token_id])
        ends.add(self.config.pad_token_id)
        completions: list[list[str]] = [[] for _ in prompts]
        counts: list[list[int]] = [[] for _ in prompts]
        token_ids: list[list[int]] = []
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            n = next((i + 1 for i, t in enumerate(toks) if t in ends), len(toks))  # the end token counts
            token_ids.append(toks[:n])
            text, _ = cut_at_stop(self.tokenizer.decode(toks[:n], skip_special_tokens=True), self.stops)
            completions[row // n_seq].append(text)
            counts[row // n_seq].append(n)
        ttft = timer.first_token_at - t0 if timer.first_token_at is not None else None
        return Batch(completions, counts, seconds, ttft, dropped, token_ids)


def read_prompts(path: str, field_name: str = "prompt", stdin: TextIO | None = None) -> list[dict[str, Any]]:
    """Records with a prompt: one per non-empty line of a text file, or per line of a JSONL file."""
    if path == "-":
        lines, where = (stdin or sys.stdin).read().splitlines(), "standard input"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"prompts_file={path}: no such file")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"prompts_file={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        where = str(p)
    jsonl = path.endswith((".jsonl", ".json")) or (lines and lines[0].lstrip().startswith("{"))
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field_name), str):
                raise DataError(f"{where}, line {n}: no {field_name!r} string field; set prompt_field=... to the field "
                                f"that holds the prompt")
            records.append(rec)
        else:
            records.append({field_name: line})
    if not records:
        raise DataError(f"{where}: no prompts in it (empty lines are skipped)")
    return records


# -- the command's output (bigml generate) ----------------------------------------------------------

def _writer(cfg):
    if cfg.output is None:
        return sys.stdout, False
    out = Path(str(cfg.output)).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return out.open("w", encoding="utf-8"), True
    except OSError as e:
        raise UsageError(f"output={cfg.output}: cannot write there ({e.strerror})") from None


def decode_prompts(cfg, model, tokenizer, records, single: bool, field: str, stops: list[str], dtype) -> dict[str, Any]:
    """`bigml generate` for causal LMs: decode every record's prompt, write text or JSONL."""
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
    from bigml.decode_speed import prepare

    bs = int(cfg.batch_size)
    rows = min(bs, len(records)) * max(n_seq, int(cfg.num_beams))
    model, plan = prepare(model, model.device.type, str(cfg.precision), quantize=cfg.get("quantize", "none"),
                          threads=cfg.get("threads", "auto"), compile=cfg.compile if cfg.use_cache else False,
                          rows=rows, cache_dir=str(cfg.cache_dir))
    if not cfg.use_cache:
        plan.reasons["compile"] = "off (use_cache=false: no static KV cache to compile around)"
    dtype = plan.dtype
    gen = Generator(model, tokenizer, gen_cfg, stops, chat=bool(cfg.chat), prompt_overflow=str(cfg.prompt_overflow),
                    plan=plan)
    log.info("speed: %s", plan.describe())  # after the Generator's checks: a refused call prints one line
    text_out = single and n_seq == 1 and cfg.output is None
    stream = str(cfg.stream).lower()
    stream_to = None
    if text_out and (stream == "true" or (stream == "auto" and sys.stdout.isatty())):
        stream_to = sys.stdout
    sink, is_file = (None, False) if text_out else _writer(cfg)
    total_new, total_s, first_token_s, truncated = 0, 0.0, None, []
    try:
        starts = range(0, len(records), bs)
        # a bar only for several batches: one prompt streams its text to the same terminal
        for start in track(starts, "generating", unit="batches") if len(starts) > 1 else starts:
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
             f"{gen.config.cache_implementation or 'dynamic'} KV cache") + (", compiled" if gen.compiled else "")
    ttft = f"{first_token_s * 1000:.0f} ms" if first_token_s is not None else "n/a (beam search)"
    where = f"; wrote {cfg.output}" if is_file else ""
    log.info("generated %d tokens for %d prompt%s in %.2f s: %.1f tokens/s, first token after %s "
             "(%s, %s, batch %d)%s", total_new, len(records), "" if len(records) == 1 else "s", total_s, rate, ttft,
             str(dtype).removeprefix("torch.") + ("" if plan.quantize == "none" else f", {plan.quantize} weights"),
             cache, bs, where)
    return {"prompts": len(records), "new_tokens": total_new, "seconds": round(total_s, 4),
            "tokens_per_s": round(rate, 2), "first_token_s": first_token_s, "truncated_prompts": n_trunc,
            **plan.metrics()}


def fill_masks(cfg, model, tokenizer, records, single: bool, field: str) -> dict[str, Any]:
    """`bigml generate` for masked LMs: the top fills of each [MASK]."""
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
