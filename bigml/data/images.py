"""Image data for image classification and GANs: folders per class, MNIST-format IDX files,
scikit-learn's bundled digits.

    read_image_splits(data_cfg, seed, need_train)  -> labeled.RawSplits of ImageRows
    ImageRows        uint8 images (N, C, H, W) + class names, what readers return
    PixelTensors     the encoded split: images at the model's size and channels, label ids;
                     `__getitems__` hands the DataLoader whole batches (no per-row Python work)
    PixelBatcher     collate: uint8 -> [0, 1] -> augmentation (training only) -> normalized floats
    image_processor  the transformers image processor saved in model/ (resize, rescale, normalize)

Images are kept as uint8 until a batch is made: Fashion-MNIST's 70,000 images are 55 MB that way,
four times that as floats. Transforms are plain torch (torchvision has no CPU wheel matching
torch 2.13 here, and its CUDA wheel breaks torchmetrics' imports; see DESIGN.md).
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigml.data.tensor_rows import TensorRows
from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
BUILTIN = ("digits", "fashion-mnist")


@dataclass
class ImageRows:
    """Images (uint8, N x C x H x W) and their class names ("" when the images have no classes).
    Column access (`rows["label"]`) and `select` mirror datasets.Dataset, so label checks and the
    seeded split carving of bigml.data.labeled work on it unchanged."""

    images: np.ndarray
    labels: list[str]
    files: list[str] | None = None  # where each image came from (predictions.jsonl)

    column_names = ("image", "label")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: str):
        if key == "label":
            return self.labels
        if key == "image":
            return self.images
        raise KeyError(key)

    def select(self, indices) -> ImageRows:
        idx = np.asarray(list(indices), dtype=np.int64)
        return ImageRows(self.images[idx], [self.labels[i] for i in idx],
                         [self.files[i] for i in idx] if self.files is not None else None)

    def unique(self, key: str) -> list[str]:
        return sorted(set(self[key]))

    def shuffle(self, seed: int) -> ImageRows:
        return self.select(np.random.default_rng(seed).permutation(len(self)))

    @staticmethod
    def concat(parts: list[ImageRows]) -> ImageRows:
        files = None if any(p.files is None for p in parts) else [f for p in parts for f in p.files]
        return ImageRows(np.concatenate([p.images for p in parts]), [y for p in parts for y in p.labels], files)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def describe(self) -> str:
        c, (h, w) = self.channels, self.size
        return f"{len(self)} images of {h}x{w}, {'grayscale' if c == 1 else f'{c} channels'}"


# -- readers ---------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An MNIST-format IDX file (gzipped or not): magic 0x0000, type 0x08 (uint8), ndim, sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    except (OSError, struct.error) as e:
        raise DataError(f"{path}: not a readable IDX file ({e})") from None
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an MNIST-format IDX file of bytes (magic {zero:#x}, type {dtype:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"data.dir={root}: no {stem}[.gz] there; install Fashion-MNIST with "
                    f"`apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), or point data.dir "
                    f"at a folder of MNIST-format IDX files")


def read_idx_split(root: Path, split: str, class_names: tuple[str, ...] | None) -> ImageRows:
    """train / t10k images and labels of an MNIST-format folder (Fashion-MNIST, MNIST)."""
    images = read_idx(_idx_file(root, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root, f"{split}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise DataError(f"data.dir={root}: {len(images)} {split} images but {len(labels)} labels")
    names = [class_names[y] if class_names and y < len(class_names) else str(y) for y in labels.tolist()]
    return ImageRows(np.ascontiguousarray(images[:, None]), names)


def read_digits() -> ImageRows:
    """scikit-learn's 1,797 8x8 digits (values 0..16, scaled to 0..255 so PNGs of them score alike)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data=digits needs scikit-learn (its bundled copy of the UCI digits): "
                        "pip install scikit-learn") from None
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return ImageRows(images, [str(int(y)) for y in d.target])


def _image_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def holds_images(path) -> bool:
    """Whether a data.path is a folder of images (a folder per class, or images directly)."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        return False
    for f in p.rglob("*"):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            return True
    return False


def read_folder(root: Path, key: str, size: tuple[int, int] | None, need_classes: bool) -> ImageRows:
    """root/<label>/*.png|jpg|... (a folder per class); or, when classes are not needed (GANs),
    images anywhere under root. All images are resized to `size` (default: the first image's),
    kept grayscale when every image is."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"{key}={root}: no such directory")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d))
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if need_classes and (not classes or loose):
        raise DataError(f"{key}={root}: expected a folder per class (root/<label>/*.png); "
                        f"{'found images directly in it' if loose else 'found no class folders with images'}")
    pairs = [(f, d.name) for d in classes for f in _image_files(d)] if classes and not loose else \
        [(f, "") for f in _image_files(root)]
    if not pairs:
        raise DataError(f"{key}={root}: no images (.png, .jpg, ...) in it")
    arrays, labels, files = [], [], []
    for f, label in pairs:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is None:
                    size = (im.height, im.width)
                if (im.height, im.width) != tuple(size):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{key}: {f} is not a readable image ({type(e).__name__})") from None
        labels.append(label)
        files.append(str(f))
    images = np.stack(arrays)
    if (images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all():
        images = np.ascontiguousarray(images[:, :1])  # every image is gray: one channel
    return ImageRows(images, labels, files)


def _builtin(data_cfg) -> tuple[ImageRows, ImageRows | None]:
    """(rows to carve train/val from, the dataset's own test split or None)."""
    name = str(data_cfg.get("name"))
    if name == "digits":
        return read_digits(), None
    if name == "fashion-mnist":
        root = Path(str(data_cfg.get("dir") or FASHION_MNIST_DIR)).expanduser()
        if not root.is_dir():
            raise DataError(f"data=fashion-mnist: {root} does not exist; install it with "
                            f"`apt-get install dataset-fashion-mnist` or set data.dir=<folder of IDX files>")
        return read_idx_split(root, "train", FASHION_MNIST_CLASSES), read_idx_split(root, "t10k", FASHION_MNIST_CLASSES)
    raise ConfigError("data.path", f"data={name} holds no images", "set data.path=<folder of images>, or use "
                      "data=digits | data=fashion-mnist")


def read_image_splits(data_cfg, seed: int, need_train: bool = True, need_classes: bool = True, stratify: bool = True):
    """Train / val / test ImageRows: from data.path (+ data.val_path, data.test_path) or a built-in
    dataset, carved with `seed` like labeled tables (per class when `stratify`). `need_train=False`
    (eval) keeps data.path whole as `all`."""
    from bigml.data.labeled import RawSplits, carve_missing

    size = data_cfg.get("image_size")
    size = (int(size), int(size)) if isinstance(size, int) else (tuple(int(s) for s in size) if size else None)
    path = data_cfg.get("path")
    from_builtin = not path and not (not need_train and data_cfg.get("test_path"))
    own_test = None
    main = None
    if path:
        main = read_folder(Path(str(path)).expanduser(), "data.path", size, need_classes)
    elif from_builtin:
        main, own_test = _builtin(data_cfg)
    if main is not None and data_cfg.get("max_examples"):
        n = int(data_cfg.max_examples)
        main = main.shuffle(seed).select(range(min(n, len(main))))
        if own_test is not None:
            own_test = own_test.shuffle(seed).select(range(min(max(n // 5, 1), len(own_test))))

    def other(key: str) -> ImageRows | None:
        p = data_cfg.get(key)
        if not p:
            return None
        return read_folder(Path(str(p)).expanduser(), f"data.{key}", size or (main.size if main is not None else None),
                           need_classes)

    val, test = other("val_path"), other("test_path")
    test = test if test is not None else own_test
    train, val, test = carve_missing(main, val, test, data_cfg, seed, stratify)
    if need_train and (train is None or len(train) == 0):
        raise DataError("data: no training images; set data.path=<folder per class> or data=digits | fashion-mnist")
    raw = RawSplits(train=train, val=val, test=test, all=None if from_builtin else main)
    some = raw.train if raw.train is not None else (raw.test if raw.test is not None else raw.all)
    if some is not None and need_classes:
        from bigml.tasks.base import sort_names

        raw.label_names = sort_names(set(some.labels))
    return raw


# -- tensors ---------------------------------------------------------------------------------------

def channel_stats(rows: ImageRows) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixel values in [0, 1] (fitted on the training split)."""
    x = torch.from_numpy(rows.images).float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def fit_images(images: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Images at the model's size (PIL bilinear, as the saved image processor resizes) and channels
    (gray replicated for a 3-channel model; RGB averaged for a 1-channel one)."""
    if images.shape[2:] != tuple(size):
        from PIL import Image

        out = []
        for im in images:
            mode = "L" if im.shape[0] == 1 else "RGB"
            pil = Image.fromarray(im[0] if mode == "L" else im.transpose(1, 2, 0), mode=mode)
            arr = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
            out.append(arr[None] if mode == "L" else arr.transpose(2, 0, 1))
        images = np.stack(out)
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = np.repeat(images, channels, axis=1)
        elif channels == 1:
            images = np.rint(images.astype(np.float32).mean(1, keepdims=True)).astype(np.uint8)
        else:
            raise DataError(f"the images have {images.shape[1]} channels and the model takes {channels}")
    return np.ascontiguousarray(images)


class PixelTensors(TensorRows):
    """An encoded split: uint8 images at the model's size, label ids."""

    input_attr, batch_key, columns = "images", "images", ("pixel_values", "labels")

    def __init__(self, images: np.ndarray, labels: list[int] | None, rows: ImageRows | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.tensor(labels if labels is not None else [-1] * len(images), dtype=torch.long)
        self.rows = rows
        self.truncated = 0


class PixelBatcher:
    """uint8 batch -> {"pixel_values": normalized floats, "labels"}; augments first when given one."""

    def __init__(self, mean: list[float], std: list[float], augment=None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["images"].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        c = x.shape[1]
        return {"pixel_values": (x - self.mean[:, :c]) / self.std[:, :c], "labels": batch["labels"]}


def image_processor(size: tuple[int, int], mean: list[float], std: list[float]):
    """The image processor saved beside the weights: resize (bilinear), rescale 1/255, normalize.

    Three mean/std values even for grayscale models, because transformers' image-classification
    pipeline converts every image to RGB (bigml's grayscale models average the channels back).
    ViTImageProcessorPil, not ViTImageProcessor: the latter needs torchvision and, without it,
    falls back to this class with a warning."""
    from PIL import Image
    from transformers import ViTImageProcessorPil

    three = lambda v: [float(v[0])] * 3 if len(v) == 1 else [float(x) for x in v]  # noqa: E731
    return ViTImageProcessorPil(do_resize=True, size={"height": int(size[0]), "width": int(size[1])},
                                resample=Image.BILINEAR, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                image_mean=three(mean), image_std=three(std))


def load_image_processor(path: str, key: str = "model.path"):
    p = Path(str(path)).expanduser()
    if not (p / "preprocessor_config.json").is_file():
        raise DataError(f"{key}={path}: no preprocessor_config.json (the image processor) in the directory")
    from transformers import ViTImageProcessorPil

    try:
        return ViTImageProcessorPil.from_pretrained(str(p))
    except Exception as e:
        raise DataError(f"{key}={path}: could not load the image processor ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """Images in [0, 1] (N, C, H, W) as one PNG grid with a 1-pixel gap (written atomically)."""
    import math

    from PIL import Image

    from bigml.atomic import atomic_write_bytes

    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


class ImageInputs:
    """What the finetune recipe carries where text tasks carry a tokenizer: the image processor
    (saved in model/) and the number of channels the model takes."""

    pad_token_id = None  # the recipe asks tokenizers for it

    def __init__(self, processor, channels: int):
        self.processor, self.channels = processor, int(channels)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.processor.size["height"]), int(self.processor.size["width"])

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in self.processor.image_mean][: self.channels]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.processor.image_std][: self.channels]

    def save_pretrained(self, path) -> None:
        self.processor.save_pretrained(str(path))

    def encode(self, rows: ImageRows, label2id: dict[str, int] | None) -> PixelTensors:
        images = fit_images(rows.images, self.size, self.channels)
        labels = [label2id[y] for y in rows.labels] if label2id is not None else None
        return PixelTensors(images, labels, rows)

    def batcher(self, augment=None) -> PixelBatcher:
        return PixelBatcher(self.mean, self.std, augment)
