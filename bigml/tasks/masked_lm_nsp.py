"""BERT's full pretraining objective: masked LM plus next-sentence prediction (Devlin et al. 2019).

`bigml pretrain model=bert-* objective=mlm+nsp` trains BertForPreTraining. Each packed block of the
corpus becomes a pair [CLS] A [SEP] B [SEP] (segment ids 0 / 1): A is the start of the block, and B
is, for half of the pairs (seeded), the text that follows A in the block (IsNext, label 0), else the
same stretch of another block of the batch, almost surely another place in the corpus (NotNext,
label 1). BERT built its pairs from sentences of documents; contiguous stretches of the packed
corpus are what RoBERTa's authors call segment pairs, and NSP learns from them the same way.
Masking then applies to A and B as in masked LM. Validation reports the masked-LM loss,
perplexity and accuracy as for masked_lm, plus val_nsp_accuracy and val_nsp_loss.

The exported directory loads with AutoModelForPreTraining, and its parts with AutoModelForMaskedLM
(fill-mask) and AutoModelForNextSentencePrediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigml.errors import DataError
from bigml.tasks.masked_lm import MaskedLM, mask_tokens


class MaskedLMWithNSP(MaskedLM):
    name = "masked_lm_nsp"
    summary = "masked LM + next-sentence prediction (BertForPreTraining; pretrain objective=mlm+nsp)"
    auto_class_name = "AutoModelForPreTraining"
    objective = "masked+nsp"
    mapping_names = "MODEL_FOR_PRETRAINING_MAPPING_NAMES"
    infer_priority = 45
    extra_validation_metrics = ("nsp_accuracy", "nsp_loss")

    def claims(self, config) -> bool:
        archs = list(getattr(config, "architectures", None) or [])
        return bool(archs) and archs[0].endswith("ForPreTraining") and config.model_type == "bert"

    def pretrains(self, config) -> bool:
        return False  # only when asked for (objective=mlm+nsp); continued pretraining stays masked LM

    def for_objective(self, objective):
        if objective in (None, "auto", "mlm+nsp", "masked+nsp"):
            return self
        return super().for_objective(objective)

    def check_tokenizer(self, tokenizer, where: str) -> None:
        super().check_tokenizer(tokenizer, where)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise DataError(f"{where}: next-sentence prediction needs [CLS] and [SEP] tokens; use a BERT tokenizer")

    # -- pairs -----------------------------------------------------------------------------------
    def inputs_and_labels(self, batch, seed, *, mask_token_id, special_ids, probability, vocab_size,
                          cls_token_id=None, sep_token_id=None, **_):
        if cls_token_id is None or sep_token_id is None:
            raise DataError("next-sentence prediction needs the tokenizer's [CLS] and [SEP] ids")
        n, t = batch.shape
        if n < 2 or t < 8:
            raise DataError("objective=mlm+nsp needs batches of at least 2 blocks of at least 8 tokens")
        g = torch.Generator(device=batch.device).manual_seed(seed)
        body = batch[:, : t - 3]  # room for [CLS] A [SEP] B [SEP]
        length = body.shape[1]
        split = int(torch.randint(length // 4, 3 * length // 4 + 1, (1,), generator=g, device=batch.device))
        a, b_next = body[:, :split], body[:, split:]
        not_next = torch.rand(n, generator=g, device=batch.device) < 0.5
        shift = int(torch.randint(1, n, (1,), generator=g, device=batch.device))
        b = torch.where(not_next[:, None], b_next.roll(shift, dims=0), b_next)
        cls = torch.full((n, 1), cls_token_id, dtype=batch.dtype, device=batch.device)
        sep = torch.full((n, 1), sep_token_id, dtype=batch.dtype, device=batch.device)
        ids = torch.cat([cls, a, sep, b, sep], dim=1)
        segments = torch.zeros_like(ids)
        segments[:, split + 2:] = 1
        special = torch.unique(torch.cat([special_ids.to(batch.device), cls[0], sep[0]]))
        masked, mlm_labels = mask_tokens(ids, mask_id=mask_token_id, vocab_size=vocab_size, special_ids=special,
                                         probability=probability, generator=g)
        return ({"input_ids": masked, "token_type_ids": segments},
                {"mlm": mlm_labels, "nsp": not_next.long()})

    def n_targets(self, labels) -> int:
        return int((labels["mlm"] != -100).sum())

    def _forward(self, model, inputs, labels):
        out = model(**inputs)
        logits = out.prediction_logits
        chosen = labels["mlm"] != -100
        mlm = F.cross_entropy(logits[chosen].float(), labels["mlm"][chosen])
        nsp = F.cross_entropy(out.seq_relationship_logits.float(), labels["nsp"])
        return out, mlm, nsp, chosen

    def training_loss(self, model, inputs, labels):
        _, mlm, nsp, _ = self._forward(model, inputs, labels)
        return mlm + nsp  # BertForPreTraining's loss: the two cross-entropies summed

    def loss_and_logits(self, model, inputs, labels):
        """The masked-LM part (val_loss, val_perplexity and val_accuracy stay masked-LM numbers)."""
        out, mlm, _, chosen = self._forward(model, inputs, labels)
        return mlm, out.prediction_logits[chosen], labels["mlm"][chosen]

    def validation_extras(self, model, inputs, labels):
        # a second forward of the validation batch (training computes both losses in one)
        out, _, nsp, _ = self._forward(model, inputs, labels)
        hits = (out.seq_relationship_logits.argmax(-1) == labels["nsp"]).float()
        return {"nsp_accuracy": (hits.mean(), hits.numel()), "nsp_loss": (nsp, hits.numel())}

    # -- scoring and generation -----------------------------------------------------------------
    def score_block(self, model, ids, batch_index, *, seed, mask_token_id, special_ids, probability, **kw):
        """bigml eval on a corpus: the masked-LM numbers on the same pairs pretraining builds."""
        inputs, labels = self.inputs_and_labels(ids, seed + 7919 * batch_index, mask_token_id=mask_token_id,
                                                special_ids=special_ids, probability=probability,
                                                vocab_size=model.config.vocab_size, **kw)
        loss, logits, target = self.loss_and_logits(model, inputs, labels)
        return loss, int(target.numel()), (logits.argmax(-1) == target).float()

    def generate(self, cfg, model, tokenizer, records, single, field_name, stops, dtype):
        """Fill-mask with the masked-LM part (the same weights, loaded as BertForMaskedLM)."""
        from transformers import AutoModelForMaskedLM

        mlm = AutoModelForMaskedLM.from_pretrained(model.name_or_path).to(device=model.device, dtype=dtype).eval()
        return super().generate(cfg, mlm, tokenizer, records, single, field_name, stops, dtype)

    def kd_loss(self, student_logits, teacher_logits, labels, temperature):
        raise DataError("distill a next-sentence-prediction model through its masked-LM part: "
                        "bigml compress model.path=<its model/> task=masked_lm")


TASK = MaskedLMWithNSP()
