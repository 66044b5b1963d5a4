"""Output projection and cross-entropy in one pass, chunk by chunk: no logits over the whole
vocabulary for the whole batch, in any precision.

transformers' *ForCausalLM computes `logits = hidden @ W.T` for every position (batch x length x
vocabulary, upcast to fp32), then log-softmax, then, in the backward pass, the same sizes again for
the gradients. For a small model with a large vocabulary those tensors are the largest in the step
and the elementwise passes over them are pure memory traffic. Here each chunk of rows computes its
logits, its loss and, at once, its gradients with respect to the hidden states and the weight (the
loss is a scalar, so they are known in the forward pass; the backward pass only scales them). The
idea is Liger-Kernel's fused linear cross-entropy; Liger needs Triton (GPUs), this is plain PyTorch,
so it runs on CPUs too.

Equal to transformers' loss and gradients to rounding (tests/test_pretrain.py checks both); BENCHMARKS.md's
pretraining section measures it against transformers' loss.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # rows per chunk: 1024 x a 32k vocabulary is 128 MB of fp32 logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != -100
        count = valid.sum().clamp(min=1).float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dev = hidden.device.type
        # the gradient matmuls in the precision autocast gives the forward one (bf16 under bf16-mixed)
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        w = weight.to(mm_dtype)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h = hidden[start:start + CHUNK_ROWS]
            y = target[start:start + CHUNK_ROWS]
            keep = valid[start:start + CHUNK_ROWS]
            safe_y = torch.where(keep, y, 0)
            logits = torch.nn.functional.linear(h, weight).float()  # autocast picks the matmul's precision
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - picked) * keep).sum()
            # d loss / d logits = (softmax - one_hot) / count, zero on ignored rows; in place on logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), safe_y] -= 1.0
            grad.mul_((keep.float() / count)[:, None])
            grad = grad.to(mm_dtype)
            grad_hidden[start:start + CHUNK_ROWS] = (grad @ w).to(hidden.dtype)
            grad_weight += (grad.t() @ h.to(mm_dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over targets != -100 of cross_entropy(hidden @ weight.T, target); hidden (N, H), weight (V, H)."""
    return _LinearCrossEntropy.apply(hidden, weight, target)


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The next-token loss of `model` (a *ForCausalLM) through `linear_cross_entropy`, or None where
    the model's head is not a plain projection this computes exactly (a bias, soft-capped or scaled
    logits, a compiled model whose compiled forward would be bypassed): the caller then uses the
    model's own loss."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None
            or getattr(model, "_compiled_call_impl", None) is not None
            or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
            or getattr(model, "base_model", model) is model
            or config.model_type not in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3")):
        return None
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return linear_cross_entropy(h, head.weight, input_ids[:, 1:].reshape(-1))
