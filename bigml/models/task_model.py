"""The finetuning LightningModule: a transformers model with the head its task wants, optionally
with frozen parts and LoRA adapters (peft). The task (bigml.tasks) computes the loss and the
validation metrics; this module owns what every task shares (freezing, LoRA, optimizers).

Only plain dicts and lists reach `save_hyperparameters`, so checkpoints never pickle live objects.
"""

from __future__ import annotations

import logging
from collections import deque

import pytorch_lightning as pl
import torch
from transformers import CONFIG_MAPPING

from bigml.errors import ConfigError
from bigml.models.loading import build_model, load_model
from bigml.tasks import get_task
from bigml.training.exact_resume import ExactResume
from bigml.training.nonfinite import checked_loss
from bigml.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("bigml")


def build_task_model(task, label_names: list[str], init_path: str | None, hf_config: dict | None,
                     pad_token_id: int | None):
    task = get_task(task)
    kw = task.head_kwargs(label_names)
    if init_path:
        model, _ = load_model(init_path, task, head_kwargs=kw)
    else:
        model = build_model(CONFIG_MAPPING[hf_config["model_type"]].from_dict({**hf_config, **kw}), task)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find the last token by padding
    return model


def layer_list(model) -> torch.nn.ModuleList | None:
    """The transformer blocks, in order (the ModuleList as long as num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for m in model.base_model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    return None


def freeze(model, embeddings: bool, first_layers: int) -> None:
    if embeddings:
        emb = model.get_input_embeddings()
        owner = getattr(model.base_model, "embeddings", None) or emb
        for p in owner.parameters():
            p.requires_grad_(False)
    if first_layers:
        layers = layer_list(model)
        if layers is None:
            raise ConfigError("finetune.freeze_layers", f"cannot find the layers of {type(model).__name__}")
        if first_layers > len(layers):
            raise ConfigError("finetune.freeze_layers", f"{first_layers} exceeds the model's {len(layers)} layers")
        for layer in layers[:first_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)


def apply_lora(model, task, method: dict):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = method.get("target_modules")
    config = LoraConfig(task_type=getattr(TaskType, task.peft_task_type), r=int(method.get("rank", 8)),
                        lora_alpha=float(method.get("alpha", 16)), lora_dropout=float(method.get("dropout", 0.0)),
                        target_modules=list(targets) if targets else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError("method.target_modules", str(e).splitlines()[0][:200],
                          "name modules of the model, e.g. method.target_modules=[query,value]") from None


class TaskModel(ExactResume, pl.LightningModule):
    def __init__(self, task: str, label_names: list[str], optimizer: dict, scheduler: dict,
                 init_path: str | None = None, hf_config: dict | None = None, pad_token_id: int | None = None,
                 method: dict | None = None, freeze_embeddings: bool = False, freeze_layers: int = 0,
                 class_weights: list[float] | None = None, threshold: float = 0.5, options: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task)
        model = build_task_model(self.task, label_names, init_path, hf_config, pad_token_id)
        freeze(model, freeze_embeddings, int(freeze_layers))
        method = method or {"name": "full"}
        if method.get("name") == "lora":
            model = apply_lora(model, self.task, method)
        elif method.get("name") != "full":
            raise ConfigError("method", f"unknown method {method.get('name')!r}", "choose full or lora")
        self.model = model
        if class_weights is not None:
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        else:
            self.class_weights = None
        self.options = dict(options or {})
        self.task.attach(self)  # what the task's loss needs besides the model (DPO: the reference)
        self.scorer = self.task.scorer(label_names, threshold=threshold)
        self._recent: deque[torch.Tensor] = deque(maxlen=20)
        self.samples_seen = 0
        self.tokens_trained = 0
        self.total_steps: int | None = None  # the schedule's length, when the caller knows it

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task.finetune_loss(self, batch)
        if checked_loss(self, loss, batch_idx) is None:  # trainer.on_nonfinite=skip: drop this batch
            return None
        self._recent.append(loss.detach())
        self.samples_seen += self.task.batch_examples(batch)
        self.tokens_trained += self.task.batch_trained_tokens(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def recent_train_loss(self) -> float | None:
        return float(torch.stack(list(self._recent)).float().mean()) if self._recent else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.task.finetune_score(self, self.scorer, batch)

    def on_validation_epoch_end(self) -> None:
        values = self.scorer.compute()
        self.scorer.reset()
        for k, v in values.items():
            if k != "examples" and isinstance(v, float):
                self.log(f"val_{k}", float(v), prog_bar=k in ("accuracy", "f1", "mse", "loss"))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optimizer, self.model)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)  # finetune sets total_steps
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
