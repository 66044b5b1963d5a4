"""GAN pretraining: `bigml pretrain model=dcgan data=fashion-mnist | digits | images data.path=...`.

    images --(uint8 -> [-1, 1])--> GAN (one LightningModule, manual optimization): per batch a
    discriminator step (real vs generated, BCE) then a generator step (fool the discriminator),
    each with its own Adam --every validation--> FID of gan.fid_samples generated images against
    real held-out ones, and a grid PNG of the same 64 noise vectors: <run>/samples/epoch-XXX.png
    --> <run>/model (the generator with the lowest FID, HF format: AutoModel + trust_remote_code, or
    bigml generate model.path=... num_images=64 output=grid.png)

The quality measure works offline: FID (Heusel et al. 2017, torchmetrics' FrechetInceptionDistance)
computed on the features of a classifier bigml trained on the same data (its penultimate layer), not
on Inception-v3, whose weights are a download (and torch-fidelity, which loads them, drags in a CUDA
torch). Such FIDs compare runs scored with the same classifier, not with published Inception FIDs.
With gan.fid_classifier=null a small CNN is trained on the training images first (seconds) and kept
in <run>/fid_classifier/ (a bigml image classifier: bigml eval scores it); images without classes
need gan.fid_classifier=<dir of a bigml image classifier>, else no FID is reported.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# -- the feature space of the FID ----------------------------------------------------------------

class ClassifierFeatures(torch.nn.Module):
    """Images in [0, 1] (N, C, H, W) -> the penultimate features of a bigml image classifier (its
    own resizing, channels and normalization applied first)."""

    def __init__(self, model, inputs):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size, self.channels = inputs.size, inputs.channels
        self.register_buffer("mean", torch.tensor(inputs.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(inputs.std).view(1, -1, 1, 1))
        with torch.no_grad():
            self.num_features = int(self.forward(torch.zeros(1, self.channels, *self.size)).shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        if x.shape[1] != self.channels:
            x = x.repeat(1, self.channels, 1, 1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        out = self.model(pixel_values=(x - self.mean) / self.std, output_hidden_states=True)
        h = out.hidden_states[-1]
        return h[:, 0] if h.dim() == 3 else h.flatten(1)  # ViT: the [CLS] position


def train_fid_classifier(cfg: DictConfig, raw, out_dir: Path) -> dict[str, Any]:
    """A small CNN (model=cnn's shape) trained on the GAN's training images for
    gan.classifier_epochs, saved as a bigml image classifier; returns its val accuracy."""
    from bigml.data.images import ImageInputs, channel_stats, image_processor
    from bigml.models.presets import image_config
    from bigml.models.task_model import TaskModel
    from bigml.tasks import get_task

    task = get_task("image-classification")
    names = raw.label_names
    size = raw.train.size
    config = image_config(OmegaConf.create({"arch": "cnn", "channels": [32, 64], "hidden_size": 128, "dropout": 0.25}),
                          raw.train.channels, size, task.head_kwargs(names))
    mean, std = channel_stats(raw.train)
    inputs = ImageInputs(image_processor(size, mean, std), config.num_channels)
    label2id = {n: i for i, n in enumerate(names)}
    train, val = inputs.encode(raw.train, label2id), inputs.encode(raw.val if raw.val is not None else raw.train, label2id)
    module = TaskModel(task=task.name, label_names=names,
                       optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0},
                       scheduler={"name": "constant", "warmup_steps": 0}, hf_config=config.to_dict())
    loader_cfg = OmegaConf.create({"seed": int(cfg.seed), "data": {"batch_size": 64, "augment": None, "num_workers": 0}})
    trainer = pl.Trainer(max_epochs=int(cfg.model.gan.classifier_epochs), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0)
    t0 = time.perf_counter()
    module.model.train()
    trainer.fit(module, train_dataloaders=task.train_loader(train, inputs, loader_cfg),
                val_dataloaders=task.eval_loader(val, inputs, 256))
    accuracy = float(trainer.callback_metrics.get("val_accuracy", float("nan")))
    module.model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(str(out_dir))
    inputs.save_pretrained(out_dir)
    import json

    (out_dir / "bigml.json").write_text(json.dumps({"command": "pretrain", "task": task.name, "labels": names,
                                                    "purpose": "FID features of a GAN run"}, indent=2))
    log.info("FID classifier: a CNN trained on the training images in %.1fs, val accuracy %.3f (%s)",
             time.perf_counter() - t0, accuracy, out_dir)
    return {"fid_classifier": str(out_dir), "fid_classifier_val_accuracy": round(accuracy, 6)}


def load_features(path: str) -> ClassifierFeatures:
    """The FID feature extractor from a bigml image classifier directory."""
    from transformers import AutoModelForImageClassification

    from bigml.data.images import ImageInputs, load_image_processor
    from bigml.tasks.image_classification import read_model_config

    config = read_model_config(path, "gan.fid_classifier")
    try:
        model = AutoModelForImageClassification.from_pretrained(str(path))
    except Exception as e:
        raise DataError(f"gan.fid_classifier={path}: could not load an image classifier ({type(e).__name__})") from None
    inputs = ImageInputs(load_image_processor(path, "gan.fid_classifier"), int(getattr(config, "num_channels", 3)))
    return ClassifierFeatures(model, inputs)


def fid_metric(features: ClassifierFeatures, channels: int, size: tuple[int, int]):
    # imported from the module: torchmetrics.image re-exports it only when torch-fidelity is installed
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False,
                                    input_img_size=(channels, *size))


# -- the GAN ---------------------------------------------------------------------------------------

class GAN(pl.LightningModule):
    """Generator and discriminator with alternating Adam optimizers (manual optimization)."""

    def __init__(self, config: dict, lr: float, d_lr: float, betas: list[float], seed: int, fid_samples: int,
                 grid_images: int, samples_dir: str, fid_classifier: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        from bigml.models.classic import BigmlDCGANConfig, BigmlDCGANDiscriminator, BigmlDCGANGenerator

        self.automatic_optimization = False
        gen_config = BigmlDCGANConfig(**config)
        self.generator = BigmlDCGANGenerator(gen_config)
        self.discriminator = BigmlDCGANDiscriminator(gen_config)
        g = torch.Generator().manual_seed(int(seed) + 1)
        self.register_buffer("grid_noise", torch.randn(int(grid_images), gen_config.latent_dim, generator=g), persistent=False)
        # the FID metric and its frozen classifier live outside the module's submodules: not trained,
        # not checkpointed, kept on the CPU (they are small), never switched to train mode by Lightning
        fid = fid_metric(load_features(fid_classifier), gen_config.num_channels, tuple(gen_config.image_size)) \
            if fid_classifier else None
        self.__dict__["fid"] = fid
        self._real_seen = False
        self.fid_history: list[dict[str, Any]] = []
        self._recent: list[tuple[float, float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        real = batch["pixel_values"]
        opt_g, opt_d = self.optimizers()
        noise = torch.randn(real.shape[0], self.generator.config.latent_dim, device=real.device)
        fake = self.generator(noise).images
        # discriminator: real -> 1, generated -> 0 (real labels smoothed to 0.9, Salimans et al. 2016)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 0.9)) + \
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        # generator: make the discriminator say 1 (the non-saturating loss)
        d_out = self.discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_out, torch.ones_like(d_out))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        if batch_idx % 10 == 0 and not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
            from bigml.errors import TrainingDiverged

            raise TrainingDiverged(f"GAN training diverged at step {self.global_step}; lower optimizer.lr")
        self._recent = (self._recent + [(loss_d.item(), loss_g.item())])[-20:]
        self.log("train_loss_d", loss_d, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train_loss_g", loss_g, prog_bar=True, on_step=True, on_epoch=False)

    def steps(self) -> int:
        """Training batches seen: Lightning's global_step counts both optimizers' steps."""
        return self.global_step // 2

    def recent_losses(self) -> tuple[float | None, float | None]:
        if not self._recent:
            return None, None
        d, g = zip(*self._recent, strict=True)
        return float(np.mean(d)), float(np.mean(g))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.fid is not None and not self._real_seen and not self.trainer.sanity_checking:  # real statistics, once
            self.fid.update(((batch["pixel_values"] + 1) / 2).cpu(), real=True)

    @torch.no_grad()
    def draw(self, n: int, seed: int) -> torch.Tensor:
        """n generated images in [0, 1], from seeded noise (eval mode: batch norm's running stats)."""
        was = self.generator.training
        self.generator.eval()
        g = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, 256):
            noise = torch.randn(min(256, n - start), self.generator.config.latent_dim, generator=g).to(self.device)
            out.append(((self.generator(noise).images + 1) / 2).clamp(0, 1).cpu())
        self.generator.train(was)
        return torch.cat(out)

    def on_validation_epoch_end(self) -> None:
        from bigml.data.images import save_grid

        if self.trainer.sanity_checking:
            return
        self._real_seen = True
        was = self.generator.training
        self.generator.eval()
        with torch.no_grad():
            grid = ((self.generator(self.grid_noise).images + 1) / 2).clamp(0, 1).cpu()
        self.generator.train(was)
        path = Path(self.hparams.samples_dir) / f"epoch-{self.current_epoch:03d}.png"
        save_grid(grid, path)
        entry: dict[str, Any] = {"epoch": self.current_epoch, "step": self.steps(), "grid": str(path)}
        if self.fid is not None:
            self.fid.reset()  # keeps the real statistics (reset_real_features=False)
            fake = self.draw(int(self.hparams.fid_samples), int(self.hparams.seed) + 2)
            for chunk in fake.split(256):
                self.fid.update(chunk, real=False)
            fid = float(self.fid.compute())
            entry["fid"] = round(fid, 4)
            self.log("val_fid", fid, prog_bar=True)
        self.fid_history.append(entry)

    def configure_optimizers(self):
        betas = tuple(float(b) for b in self.hparams.betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=float(self.hparams.lr), betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=float(self.hparams.d_lr), betas=betas)
        return [opt_g, opt_d]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bigml_fid_history"] = self.fid_history


class _GANBatcher:
    """uint8 images -> {"pixel_values": in [-1, 1]} (the generator's tanh range)."""

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": batch["images"].float().div(127.5).sub(1.0)}


def _real_for_fid(raw, n: int, seed: int):
    """Up to n real images for the FID: the held-out splits first, then training images."""
    from bigml.data.images import ImageRows

    parts = [r for r in (raw.val, raw.test) if r is not None and len(r)]
    pool = ImageRows.concat(parts) if parts else None
    if pool is None or len(pool) < n:
        extra = raw.train.shuffle(seed).select(range(min(len(raw.train), n - (len(pool) if pool else 0))))
        pool = ImageRows.concat([p for p in (pool, extra) if p is not None])
    return pool.select(range(min(n, len(pool))))


def pretrain(cfg: DictConfig, task) -> dict[str, Any]:
    from bigml.commands.runner import print_summary
    from bigml.data.images import PixelTensors, fit_images, read_image_splits, save_grid
    from bigml.models import architectures
    from bigml.run_dir import RunDir
    from bigml.training.checkpoints import checkpoint_callbacks
    from bigml.training.trainer import build_trainer, trainer_kwargs

    if cfg.data.get("kind") != "images" and not (cfg.data.get("path") and _holds_images(cfg.data.path)):
        raise ConfigError("data", f"model=dcgan trains on images, not data={cfg.data.get('name')}",
                          "use data=digits | data=fashion-mnist | data=images data.path=<folder of images>")
    gan = cfg.model.gan
    with open_dict(cfg):
        cfg.trainer.gradient_clip_val = None  # manual optimization: Lightning does not clip (nor should it here)
    trainer_kwargs(cfg)
    run_dir = RunDir.open(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    raw = read_image_splits(cfg.data, int(cfg.seed), need_classes=False, stratify=False)
    raw.label_names = sorted({y for y in raw.train.labels if y})
    size = tuple(raw.train.size)
    if size[0] % 4 or size[1] % 4:
        raise ConfigError("data.image_size", f"the images are {size[0]}x{size[1]}; DCGAN's two stride-2 layers need "
                          f"sides that are multiples of 4", f"set data.image_size={max(4, round(size[0] / 4) * 4)}")
    channels = raw.train.channels
    config = {"latent_dim": int(cfg.model.latent_dim), "num_channels": channels, "image_size": list(size),
              "base_channels": int(cfg.model.base_channels)}

    # the FID's feature space: a classifier of these images (given, or trained now)
    extra: dict[str, Any] = {}
    classifier = gan.get("fid_classifier")
    if classifier:
        extra["fid_classifier"] = str(classifier)
    elif len(raw.label_names) >= 2 and raw.val is not None and len(raw.val):
        extra = train_fid_classifier(cfg, raw, run_dir.path / "fid_classifier")
        classifier = extra["fid_classifier"]
    else:
        log.warning("no FID: the images have no classes to train a feature classifier on; set "
                    "model.gan.fid_classifier=<a bigml image classifier of such images>")

    samples = run_dir.path / "samples"
    module = GAN(config, lr=float(cfg.optimizer.lr), d_lr=float(gan.get("d_lr") or cfg.optimizer.lr),
                 betas=list(gan.betas), seed=int(cfg.seed), fid_samples=int(gan.fid_samples),
                 grid_images=int(gan.grid_images), samples_dir=str(samples), fid_classifier=classifier)
    batch = int(cfg.data.batch_size)
    if len(raw.train) < batch:
        raise DataError(f"data: {len(raw.train)} training images, fewer than a batch of {batch}; lower data.batch_size")
    train = PixelTensors(fit_images(raw.train.images, size, channels), None)
    real = _real_for_fid(raw, int(gan.fid_samples), int(cfg.seed))
    val = PixelTensors(fit_images(real.images, size, channels), None)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(int(cfg.seed)),
                                               collate_fn=_GANBatcher())
    val_loader = torch.utils.data.DataLoader(val, batch_size=256, collate_fn=_GANBatcher())
    monitor = ("val_fid", "min") if classifier else ("step", "max")
    ckpts = checkpoint_callbacks(run_dir.checkpoints, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep),
                                 monitor=monitor[0], mode=monitor[1])
    fit_cfg = copy.deepcopy(cfg)
    trainer, meter = build_trainer(fit_cfg, run_dir.path, callbacks=ckpts, flops_per_token=None, model=module)
    n_g = architectures.count_params(module.generator)
    n_d = architectures.count_params(module.discriminator)
    log.info("model: DCGAN, generator %s and discriminator %s parameters, %d x %dx%d x %d images per step | "
             "run directory: %s", f"{n_g:,}", f"{n_d:,}", batch, size[0], size[1], channels, run_dir.path)
    if cfg.get("dry_run"):
        metrics = {"command": "pretrain", "dry_run": True, "task": task.name, "params": n_g,
                   "train_examples": len(train)}
        run_dir.write_metrics(metrics, status="dry_run")
        return metrics
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    train_time = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    history = list(module.fid_history)
    best = ckpts[1].best_model_path if classifier else None
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state, strict=False)
        log.info("best checkpoint: %s (val_fid %.4g)", best, float(ckpts[1].best_model_score))
    module.generator.eval()
    final_grid = save_grid(module.draw(int(gan.grid_images), int(cfg.seed) + 1), samples / "final.png")
    loss_d, loss_g = module.recent_losses()
    fids = [h["fid"] for h in history if "fid" in h]
    metrics: dict[str, Any] = {
        "command": "pretrain", "task": task.name, "model": str(cfg.model.get("name")), "params": n_g,
        "discriminator_params": n_d, "train_examples": len(train), "image_size": list(size), "channels": channels,
        "val_fid": min(fids) if fids else None, "val_fid_initial": fids[0] if fids else None,
        "val_fid_last": fids[-1] if fids else None,
        "fid_features": "penultimate layer of a bigml image classifier trained on the same data "
                        "(not Inception-v3): compare only runs scored with the same classifier" if classifier else None,
        **extra, "fid_samples": int(gan.fid_samples) if classifier else None, "fid_real_images": len(val),
        "fid_history": history, "train_loss_d": loss_d, "train_loss_g": loss_g, "step": module.steps(),
        "epochs": trainer.current_epoch, "train_time_s": round(train_time, 2),
        "samples_per_sec": round(meter.summary().get("samples_per_sec") or 0.0, 2),
        "samples_dir": str(samples), "grid": str(final_grid), "precision": str(trainer.precision)}
    if trainer.is_global_zero:
        run_dir.export_model(module.generator, None, metadata={
            "command": "pretrain", "task": task.name, "run_dir": str(run_dir.path), "fid_classifier": classifier,
            "data": str(cfg.data.get("path") or cfg.data.get("name"))})
        metrics["model_dir"] = str(run_dir.model_dir)
        run_dir.write_metrics(metrics)
        print_summary("bigml pretrain (GAN)", {k: metrics[k] for k in (
            "model", "params", "discriminator_params", "step", "epochs", "train_loss_d", "train_loss_g",
            "val_fid_initial", "val_fid", "fid_classifier_val_accuracy", "grid", "model_dir") if k in metrics})
    return metrics


def _holds_images(path) -> bool:
    from bigml.data.images import holds_images

    return holds_images(path)
