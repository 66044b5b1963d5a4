"""Dropout whose masks come from a counter-based hash, for training on CPU.

torch's CPU dropout draws its mask from a sequential random generator (`bernoulli_`): on 2 cores a
mask over 16x12x40x40 attention probabilities costs ~90x the multiply that applies it, and in
MiniLM finetuning the masks took 12% of the step (BENCHMARKS.md, finetuning profile). Here a mask is
a hash of (call seed, element index) computed with elementwise integer ops, which torch runs
vectorized on every core (scripts/bench_finetune.py measures both; torch has no parallel CPU
generator to ask for instead). Each 32-bit hash gives two 16-bit uniforms, so p is exact to 1/65536.

The seed of each call is drawn from torch's default generator, so `seed=` reproduces a run, exact
resume (which restores that generator) continues the same masks, and DDP ranks behave as with
torch's dropout. On GPUs torch's dropout (parallel Philox) is already cheap: `trainer.dropout_masks=auto`
uses these masks on CPU only.

`use_hash_dropout(model)` swaps every `nn.Dropout` for `HashDropout` (no parameters: state dicts and
exported weights are unchanged) and routes transformers' SDPA attention through `attention`, which
applies the same masks to the attention probabilities when training with attention dropout
(SDPA on CPU falls back to its math path with a bernoulli mask whenever dropout_p > 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "bigml_sdpa"
_INT32_GOLDEN = -1640531527  # 0x9E3779B9 as a signed 32-bit integer (Weyl sequence step)
_MUL1, _MUL2 = 0x7FEB352D, -2073254261  # lowbias32 (C. Wellons) multipliers; 0x846CA68B as signed int32


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask, True where an element is kept (probability 1 - p), a pure function of seed.

    int32 products wrap modulo 2^32 (two's complement) as the hash needs; the right shifts are
    masked to make them logical."""
    n = 1
    for s in shape:
        n *= int(s)
    x = torch.arange((n + 1) // 2, dtype=torch.int32, device=device)
    x.mul_(_INT32_GOLDEN).add_(int(seed) & 0x7FFFFFFF)
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF)).mul_(_MUL1)
    x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF)).mul_(_MUL2)
    x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    halves = x.view(torch.int16)[:n]  # two uniform 16-bit values per hash, as signed -32768..32767
    return (halves >= round(p * 65536) - 32768).view(shape)


def _draw_seed() -> int:
    """From torch's default CPU generator: the one `seed=` seeds and exact resume restores."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class _MaskedScale(torch.autograd.Function):
    """x * mask / (1 - p); the backward multiplies by the same saved mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


def hash_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x.mul(0.0)
    mask = keep_mask(x.shape, p, _draw_seed(), x.device)
    return _MaskedScale.apply(x, mask, 1.0 / (1.0 - p))


class HashDropout(nn.Dropout):
    """nn.Dropout with hash masks (a subclass: code that reads `.p` or checks the type still works)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: SDPA, except while training with attention dropout, where
    it is the math path SDPA itself would take on CPU, with a hash mask on the probabilities."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not dropout or not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    q_len, k_len = query.shape[-2], key.shape[-2]
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = hash_dropout(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def use_hash_dropout(model: nn.Module) -> int:
    """Swap the model's dropout layers for HashDropout and its SDPA attention for `attention`.
    Idempotent; returns how many dropout layers (p > 0) were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = HashDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += child.p > 0
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(sub, "set_attn_implementation"):
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTENTION_NAME, attention)
            AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # without it the padding mask is dropped
            sub.set_attn_implementation(ATTENTION_NAME)
    return swapped
