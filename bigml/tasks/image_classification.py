"""Image classification: one label per image (AutoModelForImageClassification).

Models: model=mlp (the MNIST multilayer perceptron) and model=cnn (a small convnet), bigml's own
architectures (bigml.models.classic), and model=vit-tiny (transformers' ViT). Data: a folder per
class (data.path=root/ with root/<label>/*.png), MNIST-format IDX files (data=fashion-mnist) or
scikit-learn's 8x8 digits (data=digits), read by bigml.data.images. model/ holds the weights and an
image processor (resize, rescale, normalize with the training split's mean and std), so
`pipeline("image-classification", model=dir)` runs it (with trust_remote_code=True for mlp / cnn
when bigml is not installed). data.augment= applies bigml.data.augment's image operations to the
training batches only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigml.errors import ConfigError, DataError
from bigml.tasks.classification import Classification


def require_input(cfg, kind: str, task_name: str, needs: str, hint: str, what: str) -> None:
    """The data and model of `cfg` are of input `kind` (bigml.data.modality), and no adapter method
    is asked for (LoRA adapts transformer layers of text models): else one ConfigError."""
    from bigml.data.modality import input_kind

    found = input_kind(cfg)
    if found != kind:
        raise ConfigError("task", f"{task_name} needs {needs}, and this model and data are {found}", hint)
    _refuse_lora(cfg, what)


def _refuse_lora(cfg, what: str) -> None:
    method = cfg.get("method")
    if method is not None and method.get("name") not in (None, "full"):
        raise ConfigError("method", f"{method.get('name')} adapts transformer layers of text models; {what} train in full",
                          "drop method=")


def read_model_config(path: str, key: str = "model.path"):
    """A model directory's config (bigml's own architectures registered), for tasks that start
    from one without the text tokenizer (bigml.models.loading re-reads it to load the weights)."""
    from transformers import AutoConfig

    from bigml.models import classic  # noqa: F401 - registers bigml's architectures

    p = Path(str(path)).expanduser()
    if not (p / "config.json").is_file():
        raise DataError(f"{key}={path}: no config.json there; point it at a bigml run's model/ folder")
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise DataError(f"{key}={path}: no weights (model.safetensors / pytorch_model.bin) in the directory")
    return AutoConfig.from_pretrained(str(p))


class ImageClassification(Classification):
    name = "image-classification"
    summary = "one label per image (AutoModelForImageClassification: mlp, cnn, vit-tiny)"
    auto_class_name = "AutoModelForImageClassification"
    infer_priority = 25
    compressible = False

    def claims(self, config) -> bool:
        archs = list(getattr(config, "architectures", None) or [])
        return bool(archs) and archs[0].endswith("ForImageClassification")

    def for_config(self, cfg):
        require_input(cfg, "image", "image-classification", "images",
                      "use model=mlp | cnn | vit-tiny with data=digits | fashion-mnist | data.path=<folder per class>",
                      "image models")
        return self

    # -- data ----------------------------------------------------------------------------------
    def read_splits(self, cfg, seed: int):
        from bigml.data.images import read_image_splits

        raw = read_image_splits(cfg.data, seed, stratify=self.stratify)
        if len(raw.label_names) < 2:
            raise DataError(f"data: the training images have {len(raw.label_names)} class "
                            f"({', '.join(raw.label_names) or 'none'}); image classification needs at least 2 "
                            f"(a folder per class: root/<label>/*.png)")
        return raw

    def preprocessor_and_config(self, cfg, raw):
        from bigml.data.images import ImageInputs, channel_stats, image_processor, load_image_processor
        from bigml.models.presets import image_config

        if cfg.model.get("path"):
            path = str(cfg.model.path)
            config = read_model_config(path)
            return ImageInputs(load_image_processor(path), int(getattr(config, "num_channels", 3))), config, None
        size = cfg.data.get("image_size")
        size = (int(size), int(size)) if isinstance(size, int) else tuple(size) if size else raw.train.size
        config = image_config(cfg.model, raw.train.channels, size, self.head_kwargs(raw.label_names))
        mean, std = channel_stats(raw.train)  # fitted on the training split only
        inputs = ImageInputs(image_processor(size, mean, std), config.num_channels)
        return inputs, None, config.to_dict()

    def load_preprocessor(self, path: str, key: str = "model.path"):
        from bigml.data.images import ImageInputs, load_image_processor

        return ImageInputs(load_image_processor(path, key), int(getattr(read_model_config(path, key), "num_channels", 3)))

    def prepare_tokenizer(self, tokenizer, cfg) -> None:
        pass

    def describe_labels(self, names):
        return f"{len(names)} classes ({', '.join(names[:10])})"

    def augment_training(self, train, cfg):
        from bigml.data.augment import IMAGE_OPS, op_names

        op_names(cfg.data.get("augment"), IMAGE_OPS)  # checked now; applied to each training batch
        return train

    def encode(self, ds, tokenizer, label2id, max_length, where="data"):
        return tokenizer.encode(ds, label2id)

    def train_loader(self, encoded, tokenizer, cfg):
        from bigml.data.augment import IMAGE_OPS, ImageAugment, op_names

        ops = op_names(cfg.data.get("augment"), IMAGE_OPS)
        augment = ImageAugment(ops, int(cfg.seed)) if ops else None
        return torch.utils.data.DataLoader(encoded, batch_size=int(cfg.data.batch_size), shuffle=True,
                                           generator=torch.Generator().manual_seed(int(cfg.seed)),
                                           collate_fn=tokenizer.batcher(augment),
                                           num_workers=int(cfg.data.get("num_workers") or 0))

    def eval_loader(self, encoded, tokenizer, batch_size):
        return torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=tokenizer.batcher())

    def batch_trained_tokens(self, batch) -> int:
        return 0

    # -- scoring -------------------------------------------------------------------------------
    def encode_for_eval(self, model, tokenizer, cfg, split):
        from bigml.data.images import read_image_splits
        from bigml.tasks._labeled_eval import resolve_split

        names = self.model_label_names(model.config)
        raw = read_image_splits(cfg.data, int(cfg.get("seed", 0)), need_train=False, stratify=self.stratify)
        split = resolve_split(cfg, raw) if split == "auto" else split
        ds = raw.get(split)
        label2id = {n: i for i, n in enumerate(names)}
        self.check_labels(ds, label2id, f"data ({split} split)", "the model's labels")
        return self.encode(ds, tokenizer, label2id, 0), ds, names

    def row_inputs(self, raw_rows):
        files = raw_rows.files
        return [{"image": files[i] if files is not None else i} for i in range(len(raw_rows))]


TASK = ImageClassification()
