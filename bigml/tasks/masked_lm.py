"""Masked language modeling (BERT style): predict masked tokens. Masking happens on the model's
device from a generator seeded per step (training) or per batch (scoring), so a resumed run masks
as an uninterrupted one would, and two evaluations give the same numbers."""

from __future__ import annotations

import torch

from bigml.errors import DataError
from bigml.tasks.base import LanguageModelTask


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: torch.Tensor,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose `probability` of the non-special tokens; of those 80% -> [MASK],
    10% -> a random token, 10% unchanged. Returns (inputs, labels with -100 where not chosen).

    transformers' DataCollatorForLanguageModeling does the same on CPU in the loader with the global
    RNG; doing it here keeps it on the accelerator and tied to a per-step seed (exact resume).
    """
    dev = input_ids.device
    labels = input_ids.clone()
    special = torch.isin(input_ids, special_ids)
    chosen = (torch.rand(input_ids.shape, generator=generator, device=dev) < probability) & ~special
    if not chosen.any():  # tiny batches: always train on at least one token
        candidates = (~special).nonzero()
        if len(candidates):
            chosen[tuple(candidates[0])] = True
    labels[~chosen] = -100
    roll = torch.rand(input_ids.shape, generator=generator, device=dev)
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)[swap]
    return inputs, labels


def _mlm_head(model) -> torch.nn.Module | None:
    """The prediction head of a *ForMaskedLM model when it is one module beside the encoder
    (BERT's `cls`, RoBERTa's `lm_head`), else None."""
    base = model.base_model
    others = [m for m in model.children() if m is not base]
    return others[0] if len(others) == 1 and base is not model else None


class MaskedLM(LanguageModelTask):
    name = "masked_lm"
    summary = "masked-token prediction (BERT style encoders)"
    auto_class_name = "AutoModelForMaskedLM"
    objective = "masked"
    mapping_names = "MODEL_FOR_MASKED_LM_MAPPING_NAMES"
    metrics = ("loss", "accuracy", "perplexity", "bits_per_byte", "tokens")
    special_tokens = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}
    default_tokenizer = "wordpiece"
    model_input_names = ("input_ids", "token_type_ids", "attention_mask")  # sentence pairs: segment ids
    infer_priority = 50
    endpoints = ("fill_mask",)

    def claims(self, config) -> bool:
        archs = list(getattr(config, "architectures", None) or [])
        return bool(archs) and archs[0].endswith(("ForMaskedLM", "ForPreTraining"))

    def pretrains(self, config) -> bool:
        return super().pretrains(config) and not getattr(config, "is_decoder", False)

    def post_processor(self, tok):
        """`[CLS] text [SEP]` around each document (and BERT's pair template)."""
        from tokenizers import processors

        cls, sep = self.special_tokens["cls_token"], self.special_tokens["sep_token"]
        return processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])

    def check_tokenizer(self, tokenizer, where: str) -> None:
        if tokenizer.mask_token_id is None:
            raise DataError(f"{where}: has no mask token, which masked-LM pretraining and scoring need; "
                            f"use a BERT-style tokenizer")

    def for_objective(self, objective):
        """objective=mlm+nsp: BERT's full recipe, masked LM plus next-sentence prediction."""
        if objective in ("mlm+nsp", "masked+nsp"):
            from bigml.tasks import get_task

            return get_task("masked_lm_nsp")
        return super().for_objective("masked" if objective == "mlm" else objective)

    def inputs_and_labels(self, batch, seed, *, mask_token_id, special_ids, probability, vocab_size, **_):
        g = torch.Generator(device=batch.device).manual_seed(seed)
        return mask_tokens(batch, mask_id=mask_token_id, vocab_size=vocab_size, special_ids=special_ids,
                           probability=probability, generator=g)

    def n_targets(self, labels: torch.Tensor) -> int:
        return int((labels != -100).sum())

    def loss_and_logits(self, model, inputs, labels):
        """Masked LMs score ~15% of positions, so the vocabulary projection runs on those rows only
        (transformers' *ForMaskedLM projects every position and then ignores 85% of them; with a
        small encoder the projection is most of the compute)."""
        head = _mlm_head(model)
        chosen = labels != -100
        if head is None:
            out = model(input_ids=inputs, labels=labels)
            return out.loss, out.logits[chosen], labels[chosen]
        hidden = model.base_model(input_ids=inputs).last_hidden_state
        logits = head(hidden[chosen])
        target = labels[chosen]
        return torch.nn.functional.cross_entropy(logits.float(), target), logits, target

    def accuracy_reported(self) -> bool:
        return True

    def score_block(self, model, ids, batch_index, *, seed, mask_token_id, special_ids, probability, **_):
        g = torch.Generator(device=ids.device).manual_seed(seed + 7919 * batch_index)
        inputs, labels = mask_tokens(ids, mask_id=mask_token_id, vocab_size=model.config.vocab_size,
                                     special_ids=special_ids, probability=probability, generator=g)
        logits = model(input_ids=inputs).logits.float()
        chosen = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen])
        hits = (logits[chosen].argmax(-1) == labels[chosen]).float()
        return loss, int(chosen.sum()), hits

    def generate(self, cfg, model, tokenizer, records, single, field_name, stops, dtype):
        from bigml.generation import fill_masks

        return fill_masks(cfg, model, tokenizer, records, single, field_name)

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        keep = labels != -100
        return super().kd_loss(student_logits[keep], teacher_logits[keep], labels, temperature)


TASK = MaskedLM()
