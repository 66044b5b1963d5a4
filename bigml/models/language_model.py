"""The pretraining LightningModule: a transformers language model plus its task (causal_lm or
masked_lm, bigml.tasks), which turns a block of tokens into inputs and labels and scores them.

Masked LMs are masked on the model's device from a generator seeded by the step number, so a
resumed run masks exactly as an uninterrupted one would, and validation masks identically on
every run (the numbers are comparable across runs and machines).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from transformers import CONFIG_MAPPING

from bigml.models.loading import build_model, load_model
from bigml.tasks import get_task
from bigml.training.exact_resume import ExactResume
from bigml.training.nonfinite import checked_loss
from bigml.training.optim import build_optimizer, build_scheduler


class LanguageModel(ExactResume, pl.LightningModule):
    """Wraps a transformers *ForCausalLM / *ForMaskedLM model.

    Only plain dicts reach `save_hyperparameters`, so checkpoints never pickle live objects.
    """

    def __init__(self, hf_config: dict, task: str, optimizer: dict, scheduler: dict,
                 init_path: str | None = None, mlm_probability: float = 0.15, special_ids: list[int] | None = None,
                 mask_token_id: int | None = None, seed: int = 0, compile: bool = False,
                 token_ids: dict[str, int | None] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task)
        if init_path:
            self.model, _ = load_model(init_path, self.task)
        else:
            self.model = build_model(CONFIG_MAPPING[hf_config["model_type"]].from_dict(hf_config), self.task)
        self.register_buffer("special_ids", torch.tensor(special_ids or [], dtype=torch.long), persistent=False)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_extras = torch.nn.ModuleDict({k: MeanMetric() for k in self.task.extra_validation_metrics})
        self.tokens_seen = 0
        self._recent_losses: deque[torch.Tensor] = deque(maxlen=20)
        self._pending_rng: dict | None = None
        self.last_val_step = -1
        if compile:
            # Module.compile keeps parameter names (no `_orig_mod.` prefix), so checkpoints and the
            # exported model are the same with or without compilation.
            self.model.compile()

    # -- objective (the task's) ------------------------------------------------------------------
    def _inputs_and_labels(self, batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.inputs_and_labels(batch, seed, mask_token_id=self.hparams.mask_token_id,
                                           special_ids=self.special_ids, probability=self.hparams.mlm_probability,
                                           vocab_size=self.model.config.vocab_size, **(self.hparams.token_ids or {}))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, labels=labels)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        step_seed = self.hparams.seed * 1_000_003 + self.global_step * 97 + self.global_rank
        inputs, labels = self._inputs_and_labels(batch, step_seed)
        loss = self.task.training_loss(self.model, inputs, labels)
        if checked_loss(self, loss, batch_idx) is None:  # trainer.on_nonfinite=skip: drop this batch
            return None
        self.tokens_seen += batch.numel() * self.trainer.world_size
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
        if self.task.accuracy_reported():
            loss, logits, target = self.task.loss_and_logits(self.model, inputs, labels)
            hit = (logits.argmax(-1) == target).float()
            self.val_accuracy.update(hit.mean(), weight=hit.numel())
        else:
            loss = self.task.training_loss(self.model, inputs, labels)
        self.val_loss.update(loss.detach().float(), weight=self.task.n_targets(labels))
        for name, (value, weight) in self.task.validation_extras(self.model, inputs, labels).items():
            self.val_extras[name].update(value.detach().float(), weight=weight)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        # MeanMetric.compute() already reduces across processes; sync_dist only silences Lightning
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_perplexity", torch.exp(loss.clamp(max=50)), sync_dist=True)
        if self.task.accuracy_reported():
            self.log("val_accuracy", self.val_accuracy.compute(), sync_dist=True)
        for name, metric in self.val_extras.items():
            self.log(f"val_{name}", metric.compute(), sync_dist=True)
            metric.reset()
        self.val_loss.reset()
        self.val_accuracy.reset()
        self.last_val_step = self.global_step if not self.trainer.sanity_checking else -1

    # -- optimization ----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optimizer, self.model)
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- exact resume: the token counter travels in the checkpoint (RNG streams: ExactResume) --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bigml"]["tokens_seen"] = self.tokens_seen
        # train_loss in metrics.json is the mean of the last 20 steps, also right after a resume
        checkpoint["bigml"]["recent_losses"] = [float(x) for x in self._recent_losses]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("bigml", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self._recent_losses.clear()
        self._recent_losses.extend(torch.tensor(x, dtype=torch.float32) for x in state.get("recent_losses", []))
