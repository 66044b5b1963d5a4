"""Vocabulary trimming (`bigml compress method=prune prune.structured=vocab`): drop the embedding rows
of the tokens the training data never uses, and the same tokens from the tokenizer.

For a small encoder the token embeddings are most of the parameters (MiniLM-L6: 52%): a model
finetuned on one domain uses a fraction of a 30k-token vocabulary, and the rest is dead weight on
disk and in memory. Words of new text whose pieces were all trimmed become the unknown token, so
the data the vocabulary is counted on should be the data the model will see (the task's training
split; the test split is never looked at).

Supported: WordPiece tokenizers (the BERT family) and models whose only vocabulary-sized matrix is
the input embedding (classifiers, regressors, taggers). A byte-level BPE vocabulary cannot lose
tokens without its merges changing meaning, and an LM head would need its output rows kept in step;
both are refused with one line. transformers has no such operation (resize_token_embeddings only
cuts the end of the table), hence this module.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from bigml.errors import UsageError


def check_supported(model, tokenizer) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    kind = (spec or {}).get("model", {}).get("type")
    if kind != "WordPiece":
        raise UsageError(f"prune.structured=vocab: supports WordPiece tokenizers (BERT-family models); this "
                         f"model's tokenizer is {kind or 'not a tokenizers-library one'}")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        raise UsageError("prune.structured=vocab: this model predicts tokens (an LM head over the vocabulary), "
                         "whose rows cannot be trimmed; trim a classifier, regressor or tagger")


def used_ids(batches: Iterable[dict], tokenizer) -> list[int]:
    """Sorted token ids that occur in `batches` (their input_ids), plus every special token."""
    seen: set[int] = set(int(i) for i in tokenizer.all_special_ids)
    for batch in batches:
        seen.update(torch.unique(batch["input_ids"]).tolist())
    return sorted(seen)


def trim(model, tokenizer, keep: list[int]):
    """(model, tokenizer) with only the tokens `keep` (old ids, sorted), renumbered in that order.
    The model is changed in place; the tokenizer is a new one."""
    index = {old: new for new, old in enumerate(keep)}
    emb = model.get_input_embeddings()
    new_emb = torch.nn.Embedding(len(keep), emb.embedding_dim, padding_idx=index.get(emb.padding_idx),
                                 dtype=emb.weight.dtype, device=emb.weight.device)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[torch.tensor(keep, device=emb.weight.device)])
    model.set_input_embeddings(new_emb)
    model.config.vocab_size = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        old = getattr(model.config, key, None)
        if isinstance(old, int):
            setattr(model.config, key, index.get(old))
    return model, _trim_tokenizer(tokenizer, index)


def _trim_tokenizer(tokenizer, index: dict[int, int]):
    from transformers import AutoTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {t: index[i] for t, i in vocab.items() if i in index}
    for added in spec.get("added_tokens") or []:
        added["id"] = index[added["id"]]
    post = spec.get("post_processor") or {}
    for processor in [post, *(post.get("processors") or [])]:
        for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
            special["ids"] = [index[i] for i in special["ids"]]
        for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
            if isinstance(processor.get(key), list):
                processor[key] = [processor[key][0], index[processor[key][1]]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        if Path(tmp, "vocab.txt").exists():  # the slow tokenizer's file, in id order
            by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
            Path(tmp, "vocab.txt").write_text("".join(f"{t}\n" for t, _ in by_id), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)
