"""Pruning.

Unstructured (prune.structured=null): torch.nn.utils.prune zeroes the smallest-magnitude weights of
every Linear (global: one threshold over all of them; layer: the same share in each), keeps the
mask while an optional recovery finetune runs, then makes it permanent (`prune.remove`). The
tensors stay dense: with dense kernels the model is exactly as large and as fast as before, and
the report says so. It pays off only with sparse kernels or a compressor on the files.

Structured pruning really shrinks the model and stays a plain transformers model:
  ffn     drop the least important FFN neurons (L2 norm of their input row times their output
          column), the same number in every layer, so the config's intermediate_size describes it
  layers  drop whole transformer blocks (evenly spaced, the first and last kept), num_hidden_layers shrinks
Attention-head pruning is not offered: transformers 5 removed `prune_heads`, and a per-layer head
count cannot be written into a standard config.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from bigml.errors import ConfigError, UsageError

log = logging.getLogger("bigml")

STRUCTURED = ("ffn", "layers", "vocab")  # vocab: bigml.compression.vocab
SCOPES = ("global", "layer")
_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


def check_options(sparsity: float, structured: str | None, scope: str) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError("prune.sparsity", f"{sparsity} is outside [0, 1)", "give the share of weights to remove, e.g. 0.5")
    if structured not in (None, *STRUCTURED):
        raise ConfigError("prune.structured", f"unknown kind {structured!r}",
                          f"choose null (unstructured) or one of {', '.join(STRUCTURED)}")
    if scope not in SCOPES:
        raise ConfigError("prune.scope", f"unknown scope {scope!r}", f"choose one of {', '.join(SCOPES)}")


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear (and GPT-2 Conv1D) layers of the transformer body: not the task head, not a tied
    output embedding."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D") and mod is not out_emb \
                and name.split(".")[0] not in _HEAD_NAMES:
            found.append((name, mod))
    return found


def apply_unstructured(model: nn.Module, sparsity: float, scope: str) -> list[nn.Module]:
    """Zero `sparsity` of the weights by magnitude; the masks stay attached (see `make_permanent`)."""
    modules = [m for _, m in prunable(model)]
    if not modules:
        raise UsageError("prune: the model has no Linear layers to prune")
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for m in modules], pruning_method=torch_prune.L1Unstructured,
                                        amount=float(sparsity))
    else:
        for m in modules:
            torch_prune.l1_unstructured(m, "weight", amount=float(sparsity))
    return modules


def make_permanent(modules: list[nn.Module]) -> None:
    for m in modules:
        if torch_prune.is_pruned(m):
            torch_prune.remove(m, "weight")


# -- structure -------------------------------------------------------------------------------------

def blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The list of transformer blocks and the attribute path to it."""
    base = model.base_model
    for path in ("encoder.layer", "h", "layers", "decoder.layers", "transformer.layer"):
        try:
            mods = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mods, nn.ModuleList):
            return mods, path
    raise UsageError(f"prune/distill: cannot find the transformer blocks of a {model.config.model_type!r} model")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the blocks at `keep` (in order); the config follows."""
    layers, path = blocks(model)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):  # decoders index their KV cache by layer
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    parent, _, leaf = path.rpartition(".")
    setattr(model.base_model.get_submodule(parent) if parent else model.base_model, leaf, kept)
    model.config.num_hidden_layers = len(keep)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        model.config.layer_types = [layer_types[i] for i in keep]
    return model


def evenly_spaced(n_layers: int, n_keep: int) -> list[int]:
    if n_keep >= n_layers:
        return list(range(n_layers))
    if n_keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


def _ffn_pair(layer: nn.Module) -> tuple[list[tuple[nn.Module, str]], nn.Module]:
    """([(module, 'in'|'out')...], ...): modules whose rows (in) or columns (out) are FFN neurons."""
    for a, b in (("intermediate.dense", "output.dense"), ("mlp.c_fc", "mlp.c_proj")):
        try:
            return [(layer.get_submodule(a), "in"), (layer.get_submodule(b), "out")], layer
        except AttributeError:
            continue
    try:
        return [(layer.get_submodule("mlp.gate_proj"), "in"), (layer.get_submodule("mlp.up_proj"), "in"),
                (layer.get_submodule("mlp.down_proj"), "out")], layer
    except AttributeError:
        raise UsageError(f"prune.structured=ffn: unknown FFN layout in {type(layer).__name__}") from None


def _neuron_axis(mod: nn.Module, role: str) -> int:
    """The weight axis that indexes FFN neurons (Conv1D stores weights transposed)."""
    conv = type(mod).__name__ == "Conv1D"
    if role == "in":
        return 1 if conv else 0
    return 0 if conv else 1


def _slice(mod: nn.Module, role: str, idx: torch.Tensor) -> nn.Module:
    axis = _neuron_axis(mod, role)
    with torch.no_grad():
        mod.weight = nn.Parameter(mod.weight.index_select(axis, idx).clone())
        if role == "in" and mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias.index_select(0, idx).clone())
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif hasattr(mod, "nf"):
        mod.nf = mod.weight.shape[1]
    return mod


def prune_ffn(model: nn.Module, sparsity: float) -> int:
    """Drop `sparsity` of the FFN neurons of every block by importance; returns neurons kept per block."""
    layers, _ = blocks(model)
    kept = None
    for layer in layers:
        mods, _ = _ffn_pair(layer)
        scores = None
        for mod, role in mods:
            w = mod.weight.detach().float()
            norm = w.norm(dim=1 - _neuron_axis(mod, role))
            scores = norm if scores is None else scores * norm
        n = scores.numel()
        kept = max(1, round(n * (1 - float(sparsity))))
        idx = torch.topk(scores, kept).indices.sort().values
        for mod, role in mods:
            _slice(mod, role, idx)
    cfg = model.config
    if cfg.model_type == "gpt2":
        cfg.n_inner = kept
    else:
        cfg.intermediate_size = kept
    return int(kept)


def prune_layers(model: nn.Module, sparsity: float) -> list[int]:
    layers, _ = blocks(model)
    n = len(layers)
    n_keep = max(1, n - round(n * float(sparsity)))
    keep = evenly_spaced(n, n_keep)
    keep_layers(model, keep)
    return keep
