"""The model behind `bigml serve`: requests in, batches for the model, answers out.

The model's task says which endpoints it answers (`Task.endpoints`); this module turns a request of
each kind into rows of a batch (checked first: a bad request never reaches the model), and runs a
batch of rows of one kind (`run`, called by the dynamic batcher in a worker thread).

    completions, chat_completions  -> bigml.serving.decoding (transformers' generate, per-row stops)
    predict                        -> the task's `predict` (labels, values, entity spans)
    fill_mask                      -> transformers' fill-mask pipeline
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch

from bigml.generation import context_length, unescape
from bigml.serving.decoding import BatchDecoder, Sequence
from bigml.serving.protocol import ChatRequest, CompletionRequest, Decoding, RequestError

log = logging.getLogger("bigml")


class ServedModel:
    def __init__(self, model, tokenizer, task, name: str, default_max_tokens: int = 64, max_inputs: int = 64):
        self.model, self.tokenizer, self.task, self.name = model, tokenizer, task, name
        self.endpoints = tuple(task.endpoints)
        self.default_max_tokens, self.max_inputs = default_max_tokens, max_inputs
        self.context = context_length(model.config)
        self.decoder = BatchDecoder(model, tokenizer) if "completions" in self.endpoints else None
        self._fill = None
        if "fill_mask" in self.endpoints:
            from transformers import pipeline

            if tokenizer.mask_token is None:
                raise RequestError("the tokenizer has no mask token", status=500)
            self._fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device)
        if "predict" in self.endpoints:
            from bigml.data.labeled import model_max_length

            self.max_length = model_max_length(tokenizer, model.config)

    # -- text generation ---------------------------------------------------------------------------
    def decoding(self, req: Decoding, max_tokens: int | None) -> tuple[dict[str, Any], int, list[str]]:
        """(GenerationConfig settings, max new tokens, stop strings) of a request, checked."""
        req.unsupported()
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1 (got {max_tokens})", "max_tokens")
        if not 1 <= req.n <= 16:
            raise RequestError(f"n must be between 1 and 16 (got {req.n})", "n")
        sample = req.do_sample if req.do_sample is not None else (req.temperature is not None and req.temperature > 0)
        settings: dict[str, Any] = {"do_sample": bool(sample)}
        if sample:
            temperature = 1.0 if req.temperature is None else req.temperature
            if temperature <= 0:
                raise RequestError("temperature must be > 0 when sampling (do_sample=true)", "temperature")
            settings["temperature"] = float(temperature)
            if req.top_p is not None:
                if not 0 < req.top_p <= 1:
                    raise RequestError(f"top_p must be in (0, 1] (got {req.top_p})", "top_p")
                settings["top_p"] = float(req.top_p)
            if req.top_k is not None:
                if req.top_k < 1:
                    raise RequestError(f"top_k must be at least 1 (got {req.top_k})", "top_k")
                settings["top_k"] = int(req.top_k)
        elif req.n > 1 and (req.num_beams or 1) < req.n:
            raise RequestError(f"n={req.n} greedy completions would all be the same; set temperature > 0", "n")
        if req.repetition_penalty is not None:
            if req.repetition_penalty <= 0:
                raise RequestError("repetition_penalty must be > 0 (1.0: no penalty)", "repetition_penalty")
            settings["repetition_penalty"] = float(req.repetition_penalty)
        beams = req.num_beams or 1
        if beams < 1:
            raise RequestError(f"num_beams must be at least 1 (got {beams})", "num_beams")
        if beams > 1:
            if req.stream:
                raise RequestError("beam search cannot stream; drop stream or num_beams", "num_beams")
            if req.n > 1:
                raise RequestError("n > 1 with beam search is not supported", "n")
            settings["num_beams"] = beams
            if req.length_penalty is not None:
                settings["length_penalty"] = float(req.length_penalty)
        if req.seed is not None:
            settings["seed"] = int(req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 8:
            raise RequestError("at most 8 stop strings", "stop")
        stops = [unescape(s) for s in stops]
        if any(s == "" for s in stops):
            raise RequestError("an empty stop string would stop before the first token", "stop")
        return settings, max_tokens, stops

    def _check_context(self, ids: list[int], max_tokens: int, which: str) -> None:
        if not ids:
            raise RequestError(f"{which} is empty after tokenization; give some text", which)
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise RequestError(f"{which} has {len(ids)} tokens and max_tokens is {max_tokens}: more than the model's "
                               f"context of {self.context} tokens; shorten it or lower max_tokens", which,
                               code="context_length_exceeded")

    def completion_rows(self, req: CompletionRequest) -> tuple[dict, list[Sequence], int]:
        """(decoding settings, the rows to decode, prompt tokens for usage)."""
        settings, max_tokens, stops = self.decoding(req, req.max_tokens if req.max_tokens is not None else req.max_new_tokens)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise RequestError("prompt is an empty list", "prompt")
        if len(prompts) * req.n > self.max_inputs:
            raise RequestError(f"at most {self.max_inputs} completions per request (prompts x n)", "prompt")
        rows, prompt_tokens = [], 0
        for p in prompts:
            ids = list(self.tokenizer(p)["input_ids"])
            self._check_context(ids, max_tokens, "prompt")
            prompt_tokens += len(ids)
            rows += [Sequence(ids, max_tokens, stops) for _ in range(req.n)]
        return settings, rows, prompt_tokens

    def chat_rows(self, req: ChatRequest) -> tuple[dict, list[Sequence], int]:
        limit = next((v for v in (req.max_completion_tokens, req.max_tokens, req.max_new_tokens) if v is not None), None)
        settings, max_tokens, stops = self.decoding(req, limit)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions, or serve a model "
                               "tuned with bigml finetune task=sft", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the conversation (roles out of order, ...)
            raise RequestError(f"the chat template refused the messages: {str(e).splitlines()[0]}", "messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_context(ids, max_tokens, "messages")
        if req.n > self.max_inputs:
            raise RequestError(f"n must be at most {self.max_inputs}", "n")
        return settings, [Sequence(list(ids), max_tokens, stops) for _ in range(req.n)], len(ids)

    # -- task heads and masks ------------------------------------------------------------------
    def texts(self, value: str | list[str], param: str = "input") -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise RequestError(f"{param} is an empty list", param)
        if len(texts) > self.max_inputs:
            raise RequestError(f"at most {self.max_inputs} texts per request", param)
        for i, t in enumerate(texts):
            if not t.strip():
                raise RequestError(f"{param}[{i}] is empty", param)
        return texts

    def check_lengths(self, texts: list[str], pairs: list[str] | None, limit: int | None) -> int:
        """Token count of the inputs; a text longer than the model reads is refused, not truncated."""
        args = (texts, pairs) if pairs is not None else (texts,)
        lengths = [len(x) for x in self.tokenizer(*args)["input_ids"]]
        for i, n in enumerate(lengths):
            if limit is not None and n > limit:
                raise RequestError(f"input[{i}] has {n} tokens; the model reads at most {limit}", "input",
                                   code="context_length_exceeded")
        return sum(lengths)

    def fill_texts(self, value: str | list[str]) -> list[str]:
        mask = self.tokenizer.mask_token
        texts = [t.replace("[MASK]", mask) for t in self.texts(value)]
        for i, t in enumerate(texts):
            if mask not in t:
                raise RequestError(f"input[{i}] has no mask to fill; put [MASK] (or {mask}) where a word should go", "input")
        return texts

    # -- batches (in a worker thread) ---------------------------------------------------------------
    def run(self, key: Hashable, items: list[Any]) -> list[Any]:
        kind = key[0]
        with torch.inference_mode():
            if kind == "generate":
                rows = [row for item in items for row in item]
                self.decoder.decode(rows, dict(key[1]))
                return [None] * len(items)
            if kind == "predict":
                texts = [t for item in items for t in item[0]]
                pairs = [p for item in items for p in item[1]] if items[0][1] is not None else None
                answers = self.task.predict(self.model, self.tokenizer, texts, pairs)
                return _split(answers, [len(item[0]) for item in items])
            if kind == "fill_mask":
                texts = [t for item in items for t in item]
                results = self._fill(texts, top_k=key[1], batch_size=len(texts))
                if len(texts) == 1:
                    results = [results]
                fills = []
                for res in results:
                    per_mask = res if res and isinstance(res[0], list) else [res]
                    fills.append([[{"token": r["token_str"].strip(), "token_id": int(r["token"]),
                                    "score": round(float(r["score"]), 6)} for r in m] for m in per_mask])
                return _split(fills, [len(item) for item in items])
        raise ValueError(f"unknown batch kind {kind!r}")


def _split(values: list, sizes: list[int]) -> list[list]:
    out, i = [], 0
    for n in sizes:
        out.append(values[i:i + n])
        i += n
    return out
