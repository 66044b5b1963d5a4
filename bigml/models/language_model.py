"""The pretraining LightningModule: a transformers language model plus its objective.

Causal LMs predict the next token (transformers shifts the labels). Masked LMs predict masked
tokens; masking happens here, on the model's device, from a generator seeded by the step number,
so a resumed run masks exactly as an uninterrupted one would, and validation masks identically on
every run (the numbers are comparable across runs and machines).
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from transformers import CONFIG_MAPPING

from bigml.errors import TrainingDiverged
from bigml.models import architectures
from bigml.training.optim import build_optimizer, build_scheduler


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


class LanguageModel(pl.LightningModule):
    """Wraps a transformers *ForCausalLM / *ForMaskedLM model.

    Only plain dicts reach `save_hyperparameters`, so checkpoints never pickle live objects.
    """

    def __init__(self, hf_config: dict, objective: str, optimizer: dict, scheduler: dict,
                 init_path: str | None = None, mlm_probability: float = 0.15, special_ids: list[int] | None = None,
                 mask_token_id: int | None = None, seed: int = 0, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if init_path:
            self.model = architectures.load_lm(init_path, objective)
        else:
            config = CONFIG_MAPPING[hf_config["model_type"]].from_dict(hf_config)
            self.model = architectures.build_lm(config, objective)
        self.objective = objective
        self.register_buffer("special_ids", torch.tensor(special_ids or [], dtype=torch.long), persistent=False)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.tokens_seen = 0
        self._recent_losses: deque[torch.Tensor] = deque(maxlen=20)
        self._pending_rng: dict | None = None
        self.last_val_step = -1
        if compile:
            # Module.compile keeps parameter names (no `_orig_mod.` prefix), so checkpoints and the
            # exported model are the same with or without compilation.
            self.model.compile()

    # -- objective -------------------------------------------------------------------------
    def _inputs_and_labels(self, batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.objective == "causal":
            return batch, batch
        g = torch.Generator(device=batch.device).manual_seed(seed)
        return mask_tokens(batch, mask_id=self.hparams.mask_token_id, vocab_size=self.model.config.vocab_size,
                           special_ids=self.special_ids, probability=self.hparams.mlm_probability, generator=g)

    def _n_targets(self, labels: torch.Tensor) -> int:
        if self.objective == "causal":
            return labels.shape[0] * (labels.shape[1] - 1)
        return int((labels != -100).sum())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, labels=labels)

    def _mlm_head(self) -> torch.nn.Module | None:
        """The prediction head of a *ForMaskedLM model when it is one module beside the encoder
        (BERT's `cls`, RoBERTa's `lm_head`), else None."""
        base = self.model.base_model
        others = [m for m in self.model.children() if m is not base]
        return others[0] if len(others) == 1 and base is not self.model else None

    def loss_and_logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits of the scored positions, their labels).

        Masked LMs score ~15% of positions, so the vocabulary projection runs on those rows only
        (transformers' *ForMaskedLM projects every position and then ignores 85% of them; with a
        small encoder the projection is most of the compute).
        """
        head = self._mlm_head() if self.objective == "masked" else None
        if head is None:
            out = self(inputs, labels)
            logits = out.logits
            if self.objective == "causal":
                return out.loss, logits[:, :-1], labels[:, 1:]
            chosen = labels != -100
            return out.loss, logits[chosen], labels[chosen]
        hidden = self.model.base_model(input_ids=inputs).last_hidden_state
        chosen = labels != -100
        logits = head(hidden[chosen])
        target = labels[chosen]
        return torch.nn.functional.cross_entropy(logits.float(), target), logits, target

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        step_seed = self.hparams.seed * 1_000_003 + self.global_step * 97 + self.global_rank
        inputs, labels = self._inputs_and_labels(batch, step_seed)
        loss = self.loss_and_logits(inputs, labels)[0] if self.objective == "masked" else self(inputs, labels).loss
        self.tokens_seen += batch.numel() * self.trainer.world_size
        if batch_idx % 10 == 0 and not torch.isfinite(loss):  # checked every 10 steps: it syncs the device
            raise TrainingDiverged(
                f"training diverged at step {self.global_step} (loss {loss.item()}); lower optimizer.lr, "
                f"raise scheduler.warmup_steps or use trainer.precision=32-true; checkpoints/ holds the last good state")
        self._recent_losses.append(loss.detach())
        # the mean over processes under DDP, so curves compare with single-device runs
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=self.trainer.world_size > 1)
        self.log("tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def recent_train_loss(self) -> float | None:
        """Mean training loss over the last 20 steps (a single batch's loss is noisy)."""
        if not self._recent_losses:
            return None
        return float(torch.stack(list(self._recent_losses)).float().mean())

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, labels = self._inputs_and_labels(batch, self.hparams.seed + 7919 * batch_idx)
        if self.objective == "masked":
            loss, logits, target = self.loss_and_logits(inputs, labels)
            hit = (logits.argmax(-1) == target).float()
            self.val_accuracy.update(hit.mean(), weight=hit.numel())
        else:
            loss = self(inputs, labels).loss
        self.val_loss.update(loss.detach().float(), weight=self._n_targets(labels))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        # MeanMetric.compute() already reduces across processes; sync_dist only silences Lightning
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_perplexity", torch.exp(loss.clamp(max=50)), sync_dist=True)
        if self.objective == "masked":
            self.log("val_accuracy", self.val_accuracy.compute(), sync_dist=True)
        self.val_loss.reset()
        self.val_accuracy.reset()
        self.last_val_step = self.global_step if not self.trainer.sanity_checking else -1

    # -- optimization ----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optimizer, self.model)
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- exact resume: RNG streams and counters travel in the checkpoint ----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bigml"] = {
            "tokens_seen": self.tokens_seen,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("bigml", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self._pending_rng = state.get("rng")

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint, so nothing that runs in between (dataloader
        # set-up, sanity validation) can consume random numbers.
        rng, self._pending_rng = self._pending_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
