"""Supervised instruction tuning of a causal LM: conversations, prompt/completion pairs or Alpaca
rows, rendered with a chat template, loss on the answers only (sft.train_on_prompt=true: on
everything). Scored by loss / perplexity on answer tokens, and with eval.generate=true by greedy
answers against the references (exact match, contains, chrF, ROUGE-L).

Batching: grouped by length and padded per batch, or with sft.packing=true several conversations
per row of data.max_length tokens. A packed row carries position ids that restart at 0 for each
conversation and no attention mask: transformers (sdpa and eager attention) then builds a
block-diagonal causal mask, so no conversation sees another (tested against running each alone).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from bigml.data import chat
from bigml.progress import track
from bigml.tasks._report import Report
from bigml.tasks._scoring import scoring_batches
from bigml.tasks.causal_lm import CausalLM

log = logging.getLogger("bigml")
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


class TokenLoss:
    """Mean loss per answer token over batches (what validation reports), and its perplexity."""

    def __init__(self):
        self.reset()

    def update(self, loss: torch.Tensor, tokens: int, examples: int) -> None:
        self.total += float(loss) * tokens
        self.tokens += tokens
        self.examples += examples

    def compute(self) -> dict[str, float]:
        import math

        loss = self.total / self.tokens if self.tokens else float("nan")
        return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 6), "examples": self.examples,
                "tokens": self.tokens}

    def reset(self) -> None:
        self.total, self.tokens, self.examples = 0.0, 0, 0


def answer_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal loss scores: labels after the shift, not -100."""
    return int((labels[:, 1:] != -100).sum())


def generative_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match (stripped strings equal), contains (the reference appears in the answer),
    chrF and ROUGE-L F1 (torchmetrics), each in [0, 1]."""
    from torchmetrics.text import CHRFScore
    from torchmetrics.text.rouge import ROUGEScore

    n = max(len(references), 1)
    pairs = list(zip(predictions, references, strict=True))
    rouge = ROUGEScore(rouge_keys="rougeL")(predictions, references)["rougeL_fmeasure"] if pairs else torch.tensor(0.0)
    return {"exact_match": round(sum(p.strip() == r.strip() for p, r in pairs) / n, 6),
            "contains": round(sum(r.strip() in p for p, r in pairs) / n, 6),
            "chrf": round(float(CHRFScore()(predictions, [[r] for r in references])) if pairs else 0.0, 6),
            "rouge_l": round(float(rouge), 6)}


class SFT(CausalLM):
    name = "sft"
    summary = "supervised instruction tuning of a causal LM (loss on the answers)"
    metrics = ("loss", "perplexity", "exact_match", "contains", "chrf", "rouge_l")
    metric = "loss"
    headline_metric = "perplexity"
    summary_metrics = ("perplexity", "exact_match", "contains", "chrf", "rouge_l")
    finetunable = True
    needs_base_model = True
    infer_priority = 200  # a causal LM is an SFT model only when bigml.json says so

    def claims(self, config) -> bool:
        return False

    def fits(self, config) -> bool:
        return CausalLM.claims(self, config)

    # -- data -----------------------------------------------------------------------------------
    def read_splits(self, cfg, seed: int, need_train: bool = True):
        return chat.read_conversations(cfg, seed, need_train=need_train)

    def prepare_tokenizer(self, tokenizer, cfg) -> None:
        super().prepare_tokenizer(tokenizer, cfg)
        tokenizer.chat_template = chat.chat_template(tokenizer, (cfg.get("sft") or {}).get("template"))

    def training_texts(self, ds) -> list[str]:
        return [m["content"] for row in ds["messages"] for m in row]

    def describe_labels(self, names) -> str:
        return "conversations"

    def encode(self, ds, tokenizer, label2id, max_length: int, where: str = "data", train_on_prompt: bool = False):
        skipped, truncated = Counter(), [0]

        def fn(b):
            out = {"input_ids": [], "labels": [], "length": []}
            for messages in b["messages"]:
                try:
                    ids, labels, cut = chat.encode_conversation(tokenizer, messages, max_length, train_on_prompt, where)
                except chat.SkipRow as e:
                    skipped[str(e)] += 1
                    continue
                truncated[0] += cut
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["length"].append(len(ids))
            return out

        from bigml.progress import Progress

        with Progress(f"{where}: rendering and encoding", total=len(ds), unit="conversations") as progress:
            def counted(b):
                progress.update(len(b["messages"]))
                return fn(b)

            enc = ds.map(counted, batched=True, batch_size=256, remove_columns=ds.column_names, load_from_cache_file=False)
        chat.report_skipped(skipped, len(ds), where)
        if truncated[0]:
            log.warning("%s: %d of %d conversations are longer than %d tokens and were truncated (raise "
                        "data.max_length)", where, truncated[0], len(ds), max_length)
        return enc

    def _train_on_prompt(self, cfg) -> bool:
        return bool((cfg.get("sft") or {}).get("train_on_prompt", False))

    def encode_options(self, cfg) -> dict:
        return {"train_on_prompt": self._train_on_prompt(cfg)}

    def collate_fn(self, tokenizer):
        pad = tokenizer.pad_token_id

        def collate(rows):
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                labels[i, :n] = torch.tensor(r["labels"])
                mask[i, :n] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels, "examples": torch.tensor(len(rows))}

        return collate

    def train_loader(self, encoded, tokenizer, cfg):
        if not bool((cfg.get("sft") or {}).get("packing", False)):
            return super().train_loader(encoded, tokenizer, cfg)
        from torch.utils.data import DataLoader

        blocks = pack(list(encoded["length"]), int(cfg.data.max_length), int(cfg.seed))
        log.info("sft.packing: %d conversations in %d rows of up to %d tokens (%.0f%% filled)", len(encoded),
                 len(blocks), int(cfg.data.max_length),
                 100 * sum(encoded["length"]) / max(len(blocks) * int(cfg.data.max_length), 1))
        rows = encoded.select_columns(["input_ids", "labels"]).with_format(None)
        return DataLoader(blocks, batch_size=int(cfg.data.batch_size), shuffle=True,
                          generator=torch.Generator().manual_seed(int(cfg.seed)),
                          collate_fn=packed_collate(rows, tokenizer.pad_token_id),
                          num_workers=int(cfg.data.get("num_workers") or 0))

    # -- training -------------------------------------------------------------------------------
    def finetune_loss(self, module, batch):
        return module.model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False).loss

    def finetune_score(self, module, scorer, batch):
        loss = self.finetune_loss(module, batch)
        scorer.update(loss.detach(), answer_tokens(batch["labels"]), int(batch["examples"]))

    def batch_examples(self, batch) -> int:
        return int(batch["examples"])

    def batch_trained_tokens(self, batch) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["tokens"])

    def scorer(self, label_names, ece_bins: int = 15, threshold: float = 0.5) -> TokenLoss:
        return TokenLoss()

    def export_metadata(self, cfg) -> dict:
        s = cfg.get("sft") or {}
        return {"chat_template": "sft.template" if s.get("template") not in (None, "", "auto") else "tokenizer or bigml default",
                "train_on_prompt": bool(s.get("train_on_prompt", False)), "packing": bool(s.get("packing", False))}

    # -- scoring --------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, encoded=None,
                 raw_rows=None, **_) -> Report:
        if cfg.data.get("kind") == "corpus":  # an SFT model is a causal LM: perplexity on a text corpus
            return CausalLM.evaluate(self, model, tokenizer, cfg, split, keep_rows)
        from bigml.data.labeled import effective_max_length, make_loader
        from bigml.tasks._labeled_eval import resolve_split

        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat.chat_template(tokenizer, (cfg.get("sft") or {}).get("template"))
        if tokenizer.pad_token_id is None:
            self.prepare_tokenizer(tokenizer, cfg)
        if encoded is None:
            raw = self.read_splits(cfg, int(cfg.get("seed", 0)), need_train=False)
            split = resolve_split(cfg, raw) if split == "auto" else split
            raw_rows = raw.get(split)
            max_length = effective_max_length(cfg.eval.get("max_length") or cfg.data.get("max_length"), tokenizer,
                                              model.config)
            encoded = self.encode(raw_rows, tokenizer, {}, max_length, where=f"data ({split} split)",
                                  train_on_prompt=self._train_on_prompt(cfg))
        loader = make_loader(encoded, self.collate_fn(tokenizer), int(cfg.eval.get("batch_size") or 32))
        scorer = TokenLoss()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in scoring_batches(loader, model, cfg):
                out = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False)
                scorer.update(out.loss, answer_tokens(batch["labels"]), int(batch["examples"]))
        metrics: dict[str, Any] = scorer.compute()
        rows = None
        if bool(cfg.eval.get("generate", False)) and raw_rows is not None:
            answers, rows = self._generate_answers(model, tokenizer, cfg, raw_rows)
            metrics.update(generative_scores([r["generated"] for r in rows], [r["reference"] for r in rows]))
            metrics["generated"] = answers
        if was_training:
            model.train()
        return Report(self.name, metrics, rows=rows)

    def _generate_answers(self, model, tokenizer, cfg, raw_rows) -> tuple[int, list[dict]]:
        """Greedy answers to each conversation's last user turn (the reference: its last answer)."""
        from bigml.generation import Generator

        prompts, refs = [], []
        for messages in raw_rows["messages"]:
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None or not messages[last]["content"].strip():
                continue
            prompts.append(messages[:last])
            refs.append(messages[last]["content"])
        limit = cfg.eval.get("max_generate")
        if limit is not None:
            prompts, refs = prompts[:int(limit)], refs[:int(limit)]
        gen = Generator(model, tokenizer, {"max_new_tokens": int(cfg.eval.get("max_new_tokens") or 64), "do_sample": False},
                        stops=[], chat=True, prompt_overflow="truncate")
        bs = int(cfg.eval.get("batch_size") or 32)
        rows = []
        for start in track(range(0, len(prompts), bs), "generating answers", unit="batches"):
            chunk = prompts[start:start + bs]
            out = gen.generate(chunk).completions
            for messages, ref, texts in zip(chunk, refs[start:start + bs], out, strict=True):
                text = texts[0]
                rows.append({"prompt": messages[-1]["content"] if messages else "", "reference": ref, "generated": text})
        tokenizer.padding_side = "right"
        return len(rows), rows


def pack(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most `capacity` (best-fit decreasing)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    g = torch.Generator().manual_seed(seed)
    return [bins[j] for j in torch.randperm(len(bins), generator=g).tolist()]


def packed_collate(rows, pad_id: int):
    """A batch of packed rows: conversations back to back, position ids restarting at each one (and
    at the padding), no attention mask, no loss on each conversation's first token."""

    def collate(blocks: list[list[int]]):
        seqs = []
        for block in blocks:
            ids, labels, pos = [], [], []
            for i in block:
                r = rows[i]
                ids += r["input_ids"]
                labels += [-100] + list(r["labels"][1:])
                pos += list(range(len(r["input_ids"])))
            seqs.append((ids, labels, pos))
        width = max(len(s[0]) for s in seqs)
        out_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        out_labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        out_pos = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, (ids, labels, pos) in enumerate(seqs):
            n = len(ids)
            out_ids[k, :n], out_labels[k, :n], out_pos[k, :n] = torch.tensor(ids), torch.tensor(labels), torch.tensor(pos)
            out_pos[k, n:] = torch.arange(width - n)  # the padding is a segment of its own
        return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos,
                "examples": torch.tensor(sum(len(b) for b in blocks)), "tokens": torch.tensor(sum(len(s[0]) for s in seqs))}

    return collate


TASK = SFT()
