"""Token classification (NER-style BIO tags): the text is a list of words (space-separated in a
table cell, or a JSON list), the label one tag per word. Only the first subword of a word is
scored; entity-level precision/recall/F1 follow seqeval's default mode."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from bigml.errors import DataError
from bigml.tasks.base import LabeledTask, _finish_encoding


class EntitySpans(Metric):
    """Entity-level true/false positives over BIO tag sequences (as seqeval's default mode:
    a span is a B-X (or a stray I-X) followed by I-X; it matches only if type and both ends match)."""

    full_state_update = False

    def __init__(self, id2tag: dict[int, str]):
        super().__init__()
        self.id2tag = id2tag
        self.add_state("tp", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_pred", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_gold", torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def spans(tags: list[str]) -> set[tuple[int, int, str]]:
        out, start, typ = set(), None, None
        for i, t in enumerate([*tags, "O"]):
            prefix, _, kind = t.partition("-") if "-" in t else (t, "", "")
            if start is not None and (prefix in ("O", "B") or kind != typ or prefix not in ("I",)):
                out.add((start, i, typ))
                start, typ = None, None
            if prefix in ("B", "I") and start is None:
                start, typ = i, kind
        return out

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for p_row, t_row in zip(preds.tolist(), target.tolist(), strict=False):
            keep = [(p, t) for p, t in zip(p_row, t_row, strict=False) if t != -100]
            gold = self.spans([self.id2tag[t] for _, t in keep])
            pred = self.spans([self.id2tag[p] for p, _ in keep])
            self.tp += len(gold & pred)
            self.n_pred += len(pred)
            self.n_gold += len(gold)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, n_pred, n_gold = self.tp.double(), self.n_pred.double(), self.n_gold.double()
        p = tp / n_pred if n_pred > 0 else torch.tensor(0.0, dtype=torch.float64)
        r = tp / n_gold if n_gold > 0 else torch.tensor(0.0, dtype=torch.float64)
        f = 2 * p * r / (p + r) if (p + r) > 0 else torch.tensor(0.0, dtype=torch.float64)
        return {"precision": p, "recall": r, "f1": f}


class Token(LabeledTask):
    name = "token"
    summary = "one BIO tag per word (AutoModelForTokenClassification)"
    auto_class_name = "AutoModelForTokenClassification"
    metrics = ("precision", "recall", "f1", "token_accuracy", "loss")
    metric = "f1"
    headline_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    min_labels = 2
    infer_priority = 40

    def normalize_labels(self, ds, separator, where):
        import datasets

        def to_words(b):
            words = [v if isinstance(v, list) else str(v).split() for v in b["text"]]
            tags = [[str(x) for x in v] if isinstance(v, list) else str(v).split() for v in b["label"]]
            for i, (w, t) in enumerate(zip(words, tags, strict=False)):
                if len(w) != len(t):
                    raise DataError(f"{where}: row {i} has {len(w)} words but {len(t)} tags; token labels need one tag per word")
            return {"text": words, "label": tags}
        features = ds.features.copy()
        features["text"] = datasets.Sequence(datasets.Value("string"))
        features["label"] = datasets.Sequence(datasets.Value("string"))
        return ds.map(to_words, batched=True, features=features)

    def label_names(self, ds) -> list[str]:
        seen = {x for row in ds["label"] for x in row}
        return sorted(seen, key=lambda t: (t != "O", t[2:] if t[:2] in ("B-", "I-") else t, t))  # O, then B-X, I-X

    def encode(self, ds, tokenizer, label2id, max_length, where="data"):
        truncated = [0]

        def fn(b):
            enc = tokenizer(b["text"], is_split_into_words=True, truncation=True, max_length=max_length)
            full = tokenizer(b["text"], is_split_into_words=True)["input_ids"]
            truncated[0] += sum(len(x) > max_length for x in full)
            labels = []
            for i, tags in enumerate(b["label"]):
                prev, row = None, []
                for w in enc.word_ids(i):
                    row.append(-100 if w is None or w == prev else label2id[tags[w]])
                    prev = w
                labels.append(row)
            out = dict(enc.items())
            out["labels"] = labels
            out["length"] = [len(x) for x in enc["input_ids"]]
            return out

        return _finish_encoding(ds, fn, truncated, max_length, where)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100)

    def build_metrics(self, label_names, ece_bins, threshold):
        from torchmetrics import classification as C

        return {"token_accuracy": C.MulticlassAccuracy(len(label_names), average="micro", ignore_index=-100),
                "_spans": EntitySpans(dict(enumerate(label_names)))}

    def update_metrics(self, metrics, logits, labels, threshold):
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask].long()) if mask.any() else torch.tensor(0.0)
        preds = logits.argmax(-1)
        metrics["token_accuracy"].update(preds, labels.long())
        metrics["_spans"].update(preds, labels.long())
        return loss, preds, int(mask.sum())

    def extra_metrics(self, metrics, values):
        return {k: float(v) for k, v in metrics["_spans"].compute().items()}

    def prediction_rows(self, logits, preds, labels, names):
        probs = logits.softmax(-1)
        out = []
        for p_row, y_row, pr_row in zip(preds.tolist(), labels.tolist(), probs.tolist(), strict=False):
            keep = [i for i, y in enumerate(y_row) if y != -100]
            out.append({"label": [names[y_row[i]] for i in keep], "predicted": [names[p_row[i]] for i in keep],
                        "probabilities": [round(max(pr_row[i]), 6) for i in keep]})
        return out

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        keep = labels != -100
        return super().kd_loss(student_logits[keep], teacher_logits[keep], labels, temperature)

    @torch.inference_mode()
    def predict(self, model, tokenizer, texts, pairs=None):
        """Entities of each text: its words (split on whitespace, as in training) tagged by the
        first subword of each, grouped into BIO spans with character offsets."""
        import re

        words = [[(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", t)] for t in texts]
        enc = tokenizer([[w for w, _, _ in ws] for ws in words], is_split_into_words=True, padding=True,
                        truncation=True, return_tensors="pt")
        probs = self.logits(model(**enc.to(model.device))).float().softmax(-1).cpu()
        names = self.model_label_names(model.config)
        out = []
        for i, (text, ws) in enumerate(zip(texts, words, strict=True)):
            first: dict[int, int] = {}
            for pos, w in enumerate(enc.word_ids(i)):
                if w is not None and w not in first:
                    first[w] = pos
            tagged = [(w, first[w]) for w in range(len(ws)) if w in first]  # words cut by truncation are left out
            tags = [names[int(probs[i, pos].argmax())] for _, pos in tagged]
            scores = [float(probs[i, pos].max()) for _, pos in tagged]
            entities = []
            for start, end, kind in sorted(EntitySpans.spans(tags)):
                a, b = ws[tagged[start][0]][1], ws[tagged[end - 1][0]][2]
                entities.append({"type": kind, "text": text[a:b], "start": a, "end": b,
                                 "score": round(min(scores[start:end]), 6)})
            out.append({"entities": entities, "tags": [[ws[w][0], t] for (w, _), t in zip(tagged, tags, strict=True)]})
        return out


TASK = Token()
