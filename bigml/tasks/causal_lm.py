"""Causal language modeling (GPT / Llama style): predict each next token. Pretrained on packed
corpus blocks, scored by loss / perplexity / bits per byte, decoded by `bigml generate`."""

from __future__ import annotations

import torch

from bigml.tasks.base import LanguageModelTask


class CausalLM(LanguageModelTask):
    name = "causal_lm"
    summary = "next-token prediction (GPT / Llama style decoders)"
    auto_class_name = "AutoModelForCausalLM"
    objective = "causal"
    mapping_names = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    # GPT-2's <|endoftext|> separates documents; a padding token makes batched generation and
    # classification heads work
    special_tokens = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                      "unk_token": "<|unk|>"}
    default_tokenizer = "bpe"
    infer_priority = 60
    endpoints = ("completions", "chat_completions")

    def claims(self, config) -> bool:
        archs = list(getattr(config, "architectures", None) or [])
        return bool(archs) and archs[0].endswith(("ForCausalLM", "LMHeadModel"))

    def config_special_ids(self, tokenizer):
        return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id}

    def document_separator(self, tokenizer) -> list[int]:
        if tokenizer.eos_token_id is not None:
            return [tokenizer.eos_token_id]
        if tokenizer.sep_token_id is not None:
            return [tokenizer.sep_token_id]
        return []

    def inputs_and_labels(self, batch, seed, **_):
        return batch, batch  # transformers shifts the labels

    def n_targets(self, labels: torch.Tensor) -> int:
        return labels.shape[0] * (labels.shape[1] - 1)

    def loss_and_logits(self, model, inputs, labels):
        out = model(input_ids=inputs, labels=labels)
        return out.loss, out.logits[:, :-1], labels[:, 1:]

    def training_loss(self, model, inputs, labels):
        if labels is inputs:  # pretraining: every next token counts; projection and loss fused, chunked
            from bigml.models.fused_loss import causal_lm_loss

            loss = causal_lm_loss(model, inputs)
            if loss is not None:
                return loss
        return model(input_ids=inputs, labels=labels).loss

    def score_block(self, model, ids: torch.Tensor, batch_index: int, **_) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(mean loss, targets, hits or None) of one corpus block batch."""
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return loss, target.numel(), None

    def generate(self, cfg, model, tokenizer, records, single, field_name, stops, dtype):
        from bigml.generation import decode_prompts

        return decode_prompts(cfg, model, tokenizer, records, single, field_name, stops, dtype)

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        keep = y != -100
        return super().kd_loss(s[keep], t[keep], y, temperature)


TASK = CausalLM()
