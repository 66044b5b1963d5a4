"""Direct preference optimization of a causal LM (Rafailov et al. 2023): from rows of a prompt, a
chosen and a rejected answer, raise the chosen answer's likelihood relative to the reference model
(the starting weights) more than the rejected one's.

    sigmoid (DPO)  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    ipo (IPO)      ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2   (per-token log-ratios)

pi_* / ref_* are the summed log-probabilities of the answer tokens (EOS included) under the policy
and the reference. Tokenization and both losses follow TRL's DPOTrainer (1.16), and a test checks
the loss on a fixed batch against TRL to 1e-5.

The reference log-probabilities are computed once, from the starting weights, before training
(TRL's precompute_ref_log_probs): no second copy of the model is held, with full finetuning or
LoRA. `bigml eval task=dpo` recomputes them from the starting model recorded in the model's
bigml.json (or dpo.reference=<dir>).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from bigml.data import chat
from bigml.errors import ConfigError, DataError, UsageError
from bigml.progress import track
from bigml.tasks._report import Report
from bigml.tasks._scoring import scoring_batches
from bigml.tasks.causal_lm import CausalLM

log = logging.getLogger("bigml")
LOSSES = ("sigmoid", "ipo")


def pair_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen x B, rejected x B] right-padded, with the mask of answer tokens."""
    seqs = [(r["prompt_ids"] + r["chosen_ids"], len(r["prompt_ids"])) for r in rows] + \
           [(r["prompt_ids"] + r["rejected_ids"], len(r["prompt_ids"])) for r in rows]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, n) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        answer[i, n:len(s)] = True
    batch = {"input_ids": ids, "attention_mask": mask, "answer_mask": answer}
    if "ref_chosen" in rows[0]:
        batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows], dtype=torch.float64)
    return batch


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the answer tokens, their count) per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    m = batch["answer_mask"][:, 1:]
    return (logp * m).sum(-1), m.sum(-1)


def dpo_loss(pi: torch.Tensor, ref: torch.Tensor, n: torch.Tensor, beta: float, loss_type: str):
    """(per-example losses, rewards_chosen, rewards_rejected) from [chosen; rejected] log-probs."""
    b = pi.shape[0] // 2
    lr = (pi - ref.to(pi.dtype))
    lr_c, lr_r = lr[:b], lr[b:]
    if loss_type == "ipo":
        losses = (lr_c / n[:b] - lr_r / n[b:] - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (lr_c - lr_r))
    return losses, beta * lr_c.detach(), beta * lr_r.detach()


class PreferenceScores:
    """Means over examples: loss, reward accuracy / margin, rewards and policy log-probs."""

    KEYS = ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
            "logps_rejected")

    def __init__(self):
        self.reset()

    def update(self, losses, r_c, r_r, pi) -> None:
        b = r_c.shape[0]
        values = {"loss": losses.detach(), "reward_accuracy": (r_c > r_r).double(), "reward_margin": r_c - r_r,
                  "rewards_chosen": r_c, "rewards_rejected": r_r, "logps_chosen": pi[:b].detach(),
                  "logps_rejected": pi[b:].detach()}
        for k, v in values.items():
            self.sums[k] += float(v.double().sum())
        self.n += b

    def compute(self) -> dict[str, Any]:
        out = {k: round(self.sums[k] / self.n, 6) if self.n else float("nan") for k in self.KEYS}
        out["examples"] = self.n
        return out

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.n = 0


class DPO(CausalLM):
    name = "dpo"
    summary = "preference tuning of a causal LM (DPO / IPO) from chosen and rejected answers"
    metrics = PreferenceScores.KEYS
    metric = "loss"
    headline_metric = "reward_accuracy"
    summary_metrics = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")
    finetunable = True
    needs_base_model = True
    infer_priority = 210

    def claims(self, config) -> bool:
        return False

    def fits(self, config) -> bool:
        return CausalLM.claims(self, config)

    @staticmethod
    def options(cfg) -> dict:
        t = cfg.get("dpo") or {}
        beta, loss_type = float(t.get("beta", 0.1)), str(t.get("loss_type", "sigmoid"))
        if beta <= 0:
            raise ConfigError("dpo.beta", f"{beta} must be positive")
        if loss_type not in LOSSES:
            raise ConfigError("dpo.loss_type", f"unknown loss {loss_type!r}", f"choose one of {', '.join(LOSSES)}")
        return {"beta": beta, "loss_type": loss_type}

    # -- data -----------------------------------------------------------------------------------
    def read_splits(self, cfg, seed: int, need_train: bool = True):
        self.options(cfg)
        return chat.read_preferences(cfg, seed, need_train=need_train)

    def training_texts(self, ds) -> list[str]:
        return [t for k in ("prompt", "chosen", "rejected") for t in ds[k]]

    def describe_labels(self, names) -> str:
        return "preference pairs"

    def prepare_tokenizer(self, tokenizer, cfg) -> None:
        super().prepare_tokenizer(tokenizer, cfg)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat.DEFAULT_TEMPLATE  # for conversational preference rows

    def encode(self, ds, tokenizer, label2id, max_length: int, where: str = "data"):
        dropped = [0]

        def fn(b):
            out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": []}
            for p, c, r in zip(b["prompt"], b["chosen"], b["rejected"], strict=True):
                p_ids, c_ids, r_ids = chat.encode_preference(tokenizer, p, c, r)
                if len(p_ids) >= max_length:  # no room for an answer (as TRL: dropped)
                    dropped[0] += 1
                    continue
                room = max_length - len(p_ids)  # longer answers are cut at the end (as TRL)
                out["prompt_ids"].append(p_ids)
                out["chosen_ids"].append(c_ids[:room])
                out["rejected_ids"].append(r_ids[:room])
                out["length"].append(len(p_ids) + max(len(c_ids[:room]), len(r_ids[:room])))
            return out

        enc = ds.map(fn, batched=True, batch_size=256, remove_columns=ds.column_names, load_from_cache_file=False)
        if dropped[0]:
            log.warning("%s: %d of %d preference rows have a prompt of %d tokens or more and were skipped (raise "
                        "data.max_length)", where, dropped[0], len(ds), max_length)
        if len(enc) == 0 and len(ds):
            raise DataError(f"{where}: every prompt fills data.max_length={max_length}; raise it")
        return enc

    def collate_fn(self, tokenizer):
        pad = tokenizer.pad_token_id
        return lambda rows: pair_batch(rows, pad)

    # -- training -------------------------------------------------------------------------------
    def module_options(self, cfg) -> dict:
        return self.options(cfg)

    def before_fit(self, module, encoded: dict, tokenizer, cfg) -> None:
        """The reference log-probs of every split, from the weights training starts from."""
        for split, ds in list(encoded.items()):
            encoded[split] = with_reference(module.model, ds, tokenizer, int(cfg.eval.get("batch_size") or 32))

    def _losses(self, module_or_options, model, batch):
        opts = module_or_options
        pi, n = answer_logps(model, batch)
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
        losses, r_c, r_r = dpo_loss(pi, ref, n, opts["beta"], opts["loss_type"])
        return losses, r_c, r_r, pi

    def finetune_loss(self, module, batch):
        return self._losses(module.options, module.model, batch)[0].mean()

    def finetune_score(self, module, scorer, batch):
        scorer.update(*self._losses(module.options, module.model, batch))

    def batch_examples(self, batch) -> int:
        return int(batch["ref_chosen"].shape[0])

    def batch_trained_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def scorer(self, label_names, ece_bins: int = 15, threshold: float = 0.5) -> PreferenceScores:
        return PreferenceScores()

    def export_metadata(self, cfg) -> dict:
        return {**self.options(cfg), "reference_model": str(cfg.model.get("path"))}

    # -- scoring --------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, encoded=None,
                 raw_rows=None, module=None, **_) -> Report:
        if cfg.data.get("kind") == "corpus":
            return CausalLM.evaluate(self, model, tokenizer, cfg, split, keep_rows)
        from bigml.data.labeled import effective_max_length, make_loader
        from bigml.tasks._labeled_eval import resolve_split

        opts = self.options(cfg)
        if tokenizer.pad_token_id is None:
            self.prepare_tokenizer(tokenizer, cfg)
        bs = int(cfg.eval.get("batch_size") or 32)
        if encoded is None:
            raw = self.read_splits(cfg, int(cfg.get("seed", 0)), need_train=False)
            split = resolve_split(cfg, raw) if split == "auto" else split
            max_length = effective_max_length(cfg.eval.get("max_length") or cfg.data.get("max_length"), tokenizer,
                                              model.config)
            encoded = self.encode(raw.get(split), tokenizer, {}, max_length, where=f"data ({split} split)")
        if "ref_chosen" not in encoded.column_names:
            reference = self._reference(cfg)
            encoded = with_reference(reference, encoded, tokenizer, bs)
            del reference
        scores = PreferenceScores()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in scoring_batches(make_loader(encoded, self.collate_fn(tokenizer), bs), model, cfg):
                scores.update(*self._losses(opts, model, batch))
        if was_training:
            model.train()
        return Report(self.name, scores.compute())

    def _reference(self, cfg):
        """The starting model: dpo.reference, else what the model's bigml.json recorded."""
        import json
        from pathlib import Path

        path = (cfg.get("dpo") or {}).get("reference")
        if not path:
            meta = Path(str(cfg.model.path)).expanduser() / "bigml.json"
            path = json.loads(meta.read_text()).get("reference_model") if meta.exists() else None
        if not path or path == "None":
            raise UsageError("task=dpo scores against the reference model (the weights DPO started from); "
                             "set dpo.reference=<its directory>")
        if not Path(str(path)).expanduser().exists():
            raise DataError(f"dpo.reference={path}: no such directory (the starting model of this DPO run); "
                            f"set dpo.reference=<its directory>")
        model = self.auto_class.from_pretrained(str(Path(str(path)).expanduser()), dtype=torch.float32)
        return model.eval()


def with_reference(model, ds, tokenizer, batch_size: int):
    """`ds` plus ref_chosen / ref_rejected: the summed answer log-probs under `model` (eval mode)."""
    from bigml.data.labeled import make_loader

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with torch.no_grad():
        loader = make_loader(ds, lambda rows: pair_batch(rows, tokenizer.pad_token_id), batch_size)
        for batch in track(loader, "reference log-probs", unit="batches"):
            pi, _ = answer_logps(model, {k: v.to(device) for k, v in batch.items()})
            b = pi.shape[0] // 2
            chosen += pi[:b].double().tolist()
            rejected += pi[b:].double().tolist()
    if was_training:
        model.train()
    return ds.add_column("ref_chosen", chosen).add_column("ref_rejected", rejected)


TASK = DPO()
