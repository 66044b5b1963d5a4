"""Data augmentation for training splits (`data.augment=`), seeded: images and texts.

Images (on batches in [0, 1], N x C x H x W, a fresh draw every batch):
    crop       pad by 1/8 of the side (black), crop back at a random offset
    flip       horizontal flip, half of the images
    rotate     a random rotation within +-15 degrees
    affine     rotation +-10 degrees, shift +-10%, scale 0.9-1.1
    noise      Gaussian noise, std 0.05
    erase      a random rectangle (2-20% of the image) set to 0, half of the images (cutout)
    contrast   brightness and contrast each scaled by 0.8-1.2
Texts (each training text gets `data.augment_copies` augmented copies, made once per run):
    delete     each word dropped with probability 0.1 (never all of them)
    swap       two words exchanged, once per 10 words (at least once)
    insert     a word of the text inserted again at a random place, once per 10 words
    char       a character dropped, doubled or exchanged with its neighbour in 10% of the words

Plain torch and Python: torchvision does not install beside this torch build (DESIGN.md), and the
text operations are EDA's (Wei and Zou, 2019) minus synonyms, which need WordNet (a download);
nlpaug offers the same few lines but is unmaintained and pulls requests and gdown.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from bigml.errors import ConfigError

IMAGE_OPS = ("crop", "flip", "rotate", "affine", "noise", "erase", "contrast")
TEXT_OPS = ("delete", "swap", "insert", "char")


def op_names(value, allowed: tuple[str, ...], key: str = "data.augment") -> list[str]:
    """data.augment as a list of operation names: null, a name, `a+b`, or a list."""
    if value in (None, "", "none", False):
        return []
    if isinstance(value, str):
        names = [v.strip() for v in value.replace("+", ",").split(",") if v.strip()]
    else:
        names = [str(v).strip() for v in value]
    bad = [n for n in names if n not in allowed]
    if bad:
        from bigml.errors import did_you_mean

        raise ConfigError(key, f"unknown augmentation {bad[0]!r}{did_you_mean(bad[0], allowed)}",
                          f"choose from {', '.join(allowed)}, e.g. {key}=[{allowed[0]},{allowed[1]}]")
    return names


class ImageAugment:
    """The chosen operations applied in order to each training batch, from one seeded generator
    (the same seed gives the same augmented batches, run after run)."""

    def __init__(self, ops: list[str], seed: int):
        self.ops = list(ops)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = getattr(self, op)(x)
        return x

    def crop(self, x):
        n, _, h, w = x.shape
        pad = max(1, round(min(h, w) / 8))
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = (self._rand(n) * (2 * pad + 1)).long().tolist()
        dx = (self._rand(n) * (2 * pad + 1)).long().tolist()
        return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])

    def flip(self, x):
        chosen = self._rand(x.shape[0]) < 0.5
        return torch.where(chosen.view(-1, 1, 1, 1), x.flip(-1), x)

    def _warp(self, x, angle, shift_x, shift_y, scale):
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")

    def rotate(self, x):
        n = x.shape[0]
        angle = (self._rand(n) * 2 - 1) * math.radians(15)
        zero = torch.zeros(n)
        return self._warp(x, angle, zero, zero, torch.ones(n))

    def affine(self, x):
        n = x.shape[0]
        angle = (self._rand(n) * 2 - 1) * math.radians(10)
        shift = (self._rand(2, n) * 2 - 1) * 0.2  # affine_grid coordinates span 2: 0.2 is 10% of the side
        scale = 0.9 + self._rand(n) * 0.2
        return self._warp(x, angle, shift[0], shift[1], scale)

    def noise(self, x):
        return (x + 0.05 * torch.randn(x.shape, generator=self.generator)).clamp(0, 1)

    def erase(self, x):
        n, _, h, w = x.shape
        x = x.clone()
        area = 0.02 + self._rand(n) * 0.18
        aspect = torch.exp((self._rand(n) * 2 - 1) * math.log(3))
        apply = (self._rand(n) < 0.5).tolist()
        for i in range(n):
            if not apply[i]:
                continue
            eh = max(1, min(h, round(math.sqrt(float(area[i]) * h * w * float(aspect[i])))))
            ew = max(1, min(w, round(math.sqrt(float(area[i]) * h * w / float(aspect[i])))))
            y0 = int(self._rand(1) * (h - eh + 1))
            x0 = int(self._rand(1) * (w - ew + 1))
            x[i, :, y0:y0 + eh, x0:x0 + ew] = 0
        return x

    def contrast(self, x):
        n = x.shape[0]
        brightness = (0.8 + self._rand(n) * 0.4).view(-1, 1, 1, 1)
        contrast = (0.8 + self._rand(n) * 0.4).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean * brightness).clamp(0, 1)


# -- text ------------------------------------------------------------------------------------------

def _delete(words: list[str], rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() >= 0.1]
    return kept or [rng.choice(words)]


def _swap(words: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(max(1, len(words) // 10)):
        if len(words) < 2:
            break
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def _insert(words: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(max(1, len(words) // 10)):
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    return words


def _char(words: list[str], rng: random.Random) -> list[str]:
    out = []
    for w in words:
        if len(w) > 1 and rng.random() < 0.1:
            i = rng.randrange(len(w) - 1)
            kind = rng.randrange(3)
            w = w[:i] + w[i + 1:] if kind == 0 else w[:i] + w[i] + w[i:] if kind == 1 else \
                w[:i] + w[i + 1] + w[i] + w[i + 2:]
        out.append(w)
    return out


_TEXT_FUNCS = {"delete": _delete, "swap": _swap, "insert": _insert, "char": _char}


def augment_text(text: str, ops: list[str], rng: random.Random) -> str:
    """One augmented version of `text`: the operations in order, on its whitespace-separated words."""
    words = text.split()
    if not words:
        return text
    for op in ops:
        words = _TEXT_FUNCS[op](words, rng)
    return " ".join(words)


def augment_rows(ds, ops: list[str], copies: int, seed: int, text_column: str = "text"):
    """A datasets.Dataset with, after its own rows, `copies` augmented copies of each (labels kept).
    Texts that are word lists (token tagging) are left out: their tags would no longer line up."""
    import datasets

    if not ops or copies <= 0 or len(ds) == 0:
        return ds
    if not isinstance(ds[0][text_column], str):
        raise ConfigError("data.augment", "text augmentation rewrites plain texts; this task's examples are word "
                          "lists whose tags must stay aligned", "drop data.augment")
    rng = random.Random(int(seed))
    extra = {c: [] for c in ds.column_names}
    for _ in range(copies):
        for row in ds:
            for c in ds.column_names:
                value = row[c]
                if c in (text_column, "text_pair") and isinstance(value, str):
                    value = augment_text(value, ops, rng)
                extra[c].append(value)
    return datasets.concatenate_datasets([ds, datasets.Dataset.from_dict(extra, features=ds.features)])
