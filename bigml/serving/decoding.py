"""Decoding many requests in one `generate` call: what `bigml serve` adds around transformers.

Which token comes next is transformers' business (GenerationConfig: greedy, sampling, top-k/p,
repetition penalty, beam search, the KV cache). Requests that share those settings are decoded
together in one left-padded batch; what differs per request is handled here, per row:

    RowStreamer    receives each step's new tokens (transformers' streamer hook), keeps every row's
                   text, cuts it at the row's stop strings, ends the row at its own max_tokens or at
                   an end token, and pushes text deltas to the row's stream (server-sent events)
    RowsFinished   the stopping criterion that tells `generate` which rows are done, so a batch ends
                   when its last row does and a cancelled request (client gone) stops at once

transformers' own streamers (TextIteratorStreamer) accept one sequence at a time and its
`stop_strings` apply one list to the whole batch; per-row state is why these two small classes exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bigml.generation import cut_at_stop


@dataclass
class Sequence:
    """One sequence to decode: a request's prompt (a request with n > 1 makes n of them)."""

    prompt_ids: list[int]
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    on_delta: Callable[[str], None] | None = None  # streaming: called from the decoding thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    # results
    ids: list[int] = field(default_factory=list)
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    sent: int = 0
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RowStreamer(BaseStreamer):
    """Per-row text, stops, limits and deltas, fed by `generate` one step (one token per row) at a time."""

    def __init__(self, tokenizer, rows: list[Sequence], end_ids: set[int]):
        self.tokenizer, self.rows, self.end_ids = tokenizer, rows, end_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        now = time.perf_counter()
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row.done:
                continue
            if row.first_token_at is None:
                row.first_token_at = now
            row.completion_tokens += 1
            if token in self.end_ids:
                row.finish_reason = "stop"
            else:
                row.ids.append(token)
                self._update_text(row)
            if not row.done and row.completion_tokens >= row.max_tokens:
                row.finish_reason = "length"
            if not row.done and row.cancelled.is_set():
                row.finish_reason = "cancelled"
            self._emit(row)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                row.finish_reason = "length"
            self._emit(row)

    def _update_text(self, row: Sequence) -> None:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, row.stops)
        row.text = text
        if stopped:
            row.finish_reason = "stop"

    def _emit(self, row: Sequence) -> None:
        """Send what is certain: while the row runs, hold back what could be the start of a stop
        string and an incomplete multi-byte character."""
        if row.on_delta is None:
            return
        text = row.text
        if not row.done:
            hold = max((len(s) - 1 for s in row.stops), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if len(text) > row.sent:
            row.on_delta(text[row.sent:])
            row.sent = len(text)


class RowsFinished(StoppingCriteria):
    def __init__(self, rows: list[Sequence]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class BatchDecoder:
    """A causal LM and its tokenizer, decoding batches of `Sequence`s that share decoding settings."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        tokenizer.padding_side = "left"  # decoder-only models continue from the last position
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        base = model.generation_config.to_dict() if getattr(model, "generation_config", None) else {}
        for k in ("max_length", "min_length"):
            base.pop(k, None)
        self.base = base
        eos = base.get("eos_token_id", tokenizer.eos_token_id)
        self.end_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if not self.end_ids and tokenizer.eos_token_id is not None:
            self.end_ids = {tokenizer.eos_token_id}

    def generation_config(self, settings: dict[str, Any], max_new_tokens: int) -> GenerationConfig:
        config = GenerationConfig(**{**self.base, **settings, "max_new_tokens": max_new_tokens})
        config.pad_token_id = self.tokenizer.pad_token_id
        if config.eos_token_id is None and self.end_ids:
            config.eos_token_id = sorted(self.end_ids)
        config.validate(strict=True)
        return config

    @torch.inference_mode()
    def decode(self, rows: list[Sequence], settings: dict[str, Any]) -> None:
        """Decode every row in one `generate` call; results are left in the rows."""
        seed = settings.pop("seed", None)
        config = self.generation_config(settings, max(r.max_tokens for r in rows))
        batch = self.tokenizer.pad({"input_ids": [r.prompt_ids for r in rows]}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        if seed is not None:
            torch.manual_seed(int(seed))
        if int(config.num_beams or 1) > 1:  # transformers streams no beams: the rows are cut afterwards
            out = self.model.generate(**batch, generation_config=config)
            new = out[:, batch["input_ids"].shape[1]:]
            for row, toks in zip(rows, new.tolist(), strict=True):
                n = next((i + 1 for i, t in enumerate(toks) if t in self.end_ids or t == config.pad_token_id), len(toks))
                n = min(n, row.max_tokens)
                row.ids = [t for t in toks[:n] if t not in self.end_ids]
                row.text, stopped = cut_at_stop(self.tokenizer.decode(row.ids, skip_special_tokens=True), row.stops)
                row.completion_tokens = n
                row.finish_reason = "stop" if stopped or len(row.ids) < n else "length"
                if row.on_delta is not None and row.text:
                    row.on_delta(row.text)
            return
        streamer = RowStreamer(self.tokenizer, rows, self.end_ids)
        self.model.generate(**batch, generation_config=config, streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([RowsFinished(rows)]))
