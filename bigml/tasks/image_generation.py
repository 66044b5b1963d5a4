"""Image generation: a GAN's generator draws images from noise (model=dcgan, bigml.adversarial).

Pretrained by `bigml pretrain model=dcgan data=...` (the task's own recipe), drawn by
`bigml generate model.path=... num_images=64 output=grid.png`, scored by `bigml eval` as FID
against real images of data=..., in the feature space of the classifier recorded in the model's
bigml.json (or eval.fid_classifier=<dir>). It has no labels: classification metrics, finetuning
and label gates are refused (exit 2).
"""

from __future__ import annotations

import torch

from bigml.errors import ConfigError, DataError
from bigml.tasks._report import Report
from bigml.tasks.base import LOWER_IS_BETTER, Task


class ImageGeneration(Task):
    name = "image-generation"
    summary = "images drawn from noise by a GAN generator (model=dcgan; AutoModel, bigml_dcgan)"
    auto_class_name = "AutoModel"
    metrics = ("fid", "images")
    metric = "fid"
    headline_metric = "fid"
    lower_is_better = LOWER_IS_BETTER | {"fid"}
    infer_priority = 5
    draws_images = True
    compressible = False

    def claims(self, config) -> bool:
        return getattr(config, "model_type", None) == "bigml_dcgan"

    def check_model(self, model_task, path, config) -> None:
        if model_task is not self:
            raise DataError(f"model.path={path}: a {model_task.name} model is not an image generator")

    def pretrain(self, cfg) -> dict:
        from bigml.adversarial import pretrain

        return pretrain(cfg, self)

    def load_preprocessor(self, path: str, key: str = "model.path"):
        return None  # noise in, images out

    def evaluate(self, model, tokenizer, cfg, split: str = "test", keep_rows: bool = False, **kw) -> Report:
        """FID of eval.fid_samples (1,000) generated images against real ones of cfg.data."""
        from bigml.adversarial import _real_for_fid, fid_metric, load_features
        from bigml.data.images import fit_images, read_image_splits

        if cfg.data.get("kind") != "images" and not cfg.data.get("path"):
            raise ConfigError("data", "a GAN is scored against real images",
                              "use data=digits | data=fashion-mnist | data=images data.path=<folder>")
        classifier = cfg.eval.get("fid_classifier") or _recorded_classifier(model)
        if not classifier:
            raise ConfigError("eval.fid_classifier", "this generator's bigml.json names no FID classifier",
                              "set +eval.fid_classifier=<a bigml image classifier of such images>")
        n = int(cfg.eval.get("fid_samples") or 1000)
        seed = int(cfg.get("seed", 0))
        raw = read_image_splits(cfg.data, seed, need_classes=False, stratify=False)
        size, channels = tuple(model.config.image_size), int(model.config.num_channels)
        fid = fid_metric(load_features(str(classifier)), channels, size)
        real = _real_for_fid(raw, n, seed)
        real_x = torch.from_numpy(fit_images(real.images, size, channels)).float() / 255
        for chunk in real_x.split(256):
            fid.update(chunk, real=True)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for start in range(0, n, 256):
                noise = torch.randn(min(256, n - start), model.config.latent_dim, generator=g)
                fid.update(((model(noise).images + 1) / 2).clamp(0, 1), real=False)
        return Report(self.name, {"fid": round(float(fid.compute()), 6), "images": n, "real_images": len(real),
                                  "fid_classifier": str(classifier)})

    def draw(self, cfg, model) -> dict:
        """bigml generate: num_images from seeded noise, as one PNG grid at output=."""
        import logging
        import time

        from bigml.data.images import save_grid
        from bigml.errors import UsageError

        n = int(cfg.get("num_images") or 64)
        if n < 1:
            raise ConfigError("num_images", f"{n} must be at least 1")
        if not cfg.get("output"):
            raise UsageError("a GAN draws images: give output=grid.png (one PNG grid of num_images images)")
        out = str(cfg.output)
        if not out.lower().endswith(".png"):
            raise ConfigError("output", f"{out}: images are written as one PNG grid", "use output=<name>.png")
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(cfg.seed))
        with torch.no_grad():
            noise = torch.randn(n, model.config.latent_dim, generator=g)
            images = ((model(noise).images + 1) / 2).clamp(0, 1)
        path = save_grid(images.float().cpu(), out)
        seconds = time.perf_counter() - t0
        logging.getLogger("bigml").info("drew %d images (%dx%d) in %.2f s -> %s (seed %d)", n, *images.shape[-2:],
                                        seconds, path, int(cfg.seed))
        return {"images": n, "output": str(path), "seconds": round(seconds, 4)}


def _recorded_classifier(model) -> str | None:
    """The FID classifier bigml.json of the generator's directory names (the one training used)."""
    import json
    from pathlib import Path

    meta = Path(str(getattr(model, "name_or_path", "") or "")) / "bigml.json"
    try:
        return json.loads(meta.read_text()).get("fid_classifier") if meta.is_file() else None
    except ValueError:
        return None


TASK = ImageGeneration()
