"""Distillation, and the short training runs compression needs (pruning recovery).

Students:
  half        the teacher with every other block kept (DistilBERT's recipe), weights copied from
              the teacher: embeddings, the kept blocks, the head.
  <preset>    a named architecture from conf/model (bert-mini, gpt-tiny, ...), built with the
              teacher's vocabulary, positions and labels, randomly initialized.

Loss (Hinton et al. 2015):
  alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard-label loss
  (+ hidden_weight * MSE between matching hidden states, when the widths agree)
For language models the KL runs over every predicted token (causal) or every masked position.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from bigml.compression import prune
from bigml.errors import ConfigError
from bigml.models import architectures
from bigml.models.loading import build_model
from bigml.tasks import Task, get_task
from bigml.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("bigml")


def half_student(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher)
    layers, _ = prune.blocks(student)
    n = len(layers)
    if n < 2:
        raise ConfigError("distill.student", f"half: the teacher has {n} layer; nothing to halve",
                          "name a smaller preset instead (e.g. distill.student=bert-tiny)")
    keep = list(range(0, n, 2))  # 0, 2, 4, ...: every other layer
    prune.keep_layers(student, keep)
    return student


def named_student(name: str, teacher: nn.Module, task: Task, preset_cfg) -> nn.Module:
    """A randomly initialized `name` preset with the teacher's vocabulary, positions and labels."""
    from omegaconf import open_dict

    t = teacher.config
    max_pos = t.to_dict().get("max_position_embeddings") or t.to_dict().get("n_positions")
    with open_dict(preset_cfg):
        if max_pos:
            preset_cfg.max_position_embeddings = int(max_pos)
    special = {k: getattr(t, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = architectures.hf_config_from_cfg(preset_cfg, int(t.vocab_size), special)
    task.student_config(config, t)
    return build_model(config, task)


def _hard_loss(out, task: Task) -> torch.Tensor:
    if getattr(out, "loss", None) is not None:
        return out.loss
    raise RuntimeError(f"no labels in the training batch for a {task.name} model")


class CompressionTraining(pl.LightningModule):
    """Trains `student` on batches of `{input_ids, attention_mask, labels}`; with a teacher, by
    distillation. Only the student is saved; the teacher is frozen and kept out of the optimizer."""

    def __init__(self, student: nn.Module, optimizer: dict, scheduler: dict, task: str,
                 teacher: nn.Module | None = None, temperature: float = 2.0, alpha: float = 0.5,
                 hidden_weight: float = 0.0, mask_token_id: int | None = None, special_ids: list[int] | None = None,
                 seed: int = 0):
        super().__init__()
        self.student = student
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule (not trained, not saved)
        self.opt_cfg, self.sched_cfg, self.task = optimizer, scheduler, get_task(task)
        self.temperature, self.alpha, self.hidden_weight = float(temperature), float(alpha), float(hidden_weight)
        self.mask_token_id, self.seed = mask_token_id, seed
        self.register_buffer("special_ids", torch.tensor(special_ids or [], dtype=torch.long), persistent=False)
        self.losses: list[float] = []

    def _batch(self, batch: Any) -> dict:
        if isinstance(batch, torch.Tensor):  # a packed-corpus block: the objective's inputs and labels
            inputs, labels = self.task.inputs_and_labels(
                batch, self.seed * 1_000_003 + self.global_step, mask_token_id=self.mask_token_id,
                special_ids=self.special_ids, probability=0.15, vocab_size=self.student.config.vocab_size)
            return {"input_ids": inputs, "labels": labels}
        return {k: v for k, v in dict(batch).items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

    def training_step(self, batch, batch_idx):
        batch = self._batch(batch)
        want_hidden = bool(self.teacher) and self.hidden_weight > 0
        out = self.student(**batch, output_hidden_states=want_hidden)
        hard = _hard_loss(out, self.task)
        loss = hard
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad():
                t_out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=want_hidden)
            kd = self.task.kd_loss(out.logits.float(), t_out.logits.float(), batch["labels"], self.temperature)
            loss = self.alpha * kd + (1 - self.alpha) * hard
            if want_hidden:
                s_h, t_h = out.hidden_states, t_out.hidden_states
                if s_h[-1].shape[-1] == t_h[-1].shape[-1]:
                    # student layer i matches teacher layer i * (teacher depth / student depth)
                    step = (len(t_h) - 1) / max(len(s_h) - 1, 1)
                    pairs = [(s_h[i], t_h[round(i * step)]) for i in range(1, len(s_h))]
                    loss = loss + self.hidden_weight * sum(F.mse_loss(a.float(), b.float()) for a, b in pairs) / len(pairs)
            self.log("kd_loss", kd, prog_bar=True)
        self.log("train_loss", loss, prog_bar=True)
        self.losses.append(float(loss.detach()))
        return loss

    def on_fit_start(self) -> None:
        if self.teacher:
            self.teacher[0].to(self.device).eval()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.opt_cfg, self.student)
        scheduler = build_scheduler(self.sched_cfg, optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
