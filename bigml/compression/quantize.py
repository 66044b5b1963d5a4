"""Quantization: which library does what, and how the result is stored.

    quantize.dtype=int8, backend torchao    torchao Int8DynamicActivationInt8WeightConfig (or
                                            Int8WeightOnlyConfig with quantize.weight_only=true),
                                            saved through transformers' TorchAoConfig integration:
                                            plain `AutoModelFor*.from_pretrained(dir)` loads it
                                            (with torchao installed). Fast once torch.compile'd.
    quantize.dtype=int8, backend torch.ao   torch.ao dynamic quantization of every Linear (int8
                                            weights per output channel, activations quantized per
                                            batch at run time). Deprecated upstream, the fastest
                                            int8 path in eager mode on CPUs without AMX, saved in
                                            bigml's format (storage.py): loads with bigml only.
    quantize.dtype=int4                     torchao IntxWeightOnlyConfig(int4, groups of 32)
    quantize.dtype=bf16 | fp16              a cast of every floating-point tensor

backend=auto is torchao, saved through transformers, except for models whose layers are
transformers' Conv1D (GPT-2): torchao quantizes nn.Linear only, and a Conv1D model rebuilt by
transformers would not match, so those keep bigml's format (torch.ao for int8).

quantize.exclude names modules kept in floating point (transformers' pattern rules: a module name,
a suffix such as `classifier`, or a regular expression), e.g. the task head.

bigml's format: the integers are computed once (torch.ao's own observers, or a symmetric absmax
rule for torchao schemes), saved, and every quantized model, also the one compress measures, is
rebuilt from them by `materialize`. Both formats reload bit-for-bit the model compress reported.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from bigml.errors import ConfigError

log = logging.getLogger("bigml")

QUANT_KEY = "bigml_quantization"  # in config.json: how the weights are quantized (format: storage.py)
HISTORY_KEY = "bigml_compression"  # in config.json: the compression stages this model went through
INT_SCHEMES = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
DTYPES = ("int8", "int4", "bf16", "fp16")
BACKENDS = ("auto", "torch.ao", "torchao")
INT4_GROUP = 32


def scheme_for(dtype: str, weight_only: bool) -> str:
    if dtype == "int8":
        return "int8-weight-only" if weight_only else "int8-dynamic"
    if dtype == "int4":
        return "int4-weight-only"
    return dtype


def check_options(dtype: str, backend: str, weight_only: bool, exclude: list[str] | None = None) -> None:
    if dtype not in DTYPES:
        raise ConfigError("quantize.dtype", f"unknown dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if backend not in BACKENDS:
        raise ConfigError("quantize.backend", f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    if backend == "torch.ao" and (dtype == "int4" or weight_only):
        raise ConfigError("quantize.backend", "torch.ao has only dynamic int8 for Linear layers",
                          "use quantize.backend=torchao for int4 or weight-only int8")
    import re

    for pattern in exclude or []:
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise ConfigError("quantize.exclude", f"{pattern!r} is not a valid pattern ({e})") from None


# -- which modules ---------------------------------------------------------------------------------

def conv1d_to_linear(model: nn.Module) -> None:
    """GPT-2 writes its Linear layers as transformers' Conv1D (weight stored transposed); quantizers
    only know nn.Linear, so they are swapped for equivalent Linears."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)


def target_linears(model: nn.Module, group: int | None = None, exclude: list[str] | None = None,
                   keep_output: bool = False) -> list[str]:
    """Every nn.Linear except an output projection tied to the input embeddings (quantizing it would
    untie and duplicate the vocabulary matrix; with `keep_output`, any output projection) and those
    `exclude` names (transformers' should_convert_module rules). With `group`, only those whose
    input width it divides."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not ((tied or keep_output) and mod is out_emb):
            if group and mod.in_features % group:
                continue
            if exclude and not should_convert_module(name, [str(p) for p in exclude]):
                continue
            names.append(name)
    return names


# -- the integers ----------------------------------------------------------------------------------

def _absmax_int(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: (ints, fp32 scales) per output row, or per `group` inputs of a row."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.float().reshape(w.shape[0], -1, group) if group else w.float().unsqueeze(1)
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    q = torch.round(rows / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(w.shape), scale.squeeze(-1) if group else scale.reshape(-1)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    low, high = (p & 0xF).to(torch.int16) - 8, (p >> 4).to(torch.int16) - 8
    return torch.stack([low, high], -1).reshape(p.shape[0], -1).to(torch.int8)


def _dequantize(tensors: dict, name: str, scheme: str) -> torch.Tensor:
    q = tensors[f"{name}.qweight"]
    scales = tensors[f"{name}.scales"].float()
    if scheme == "int4-weight-only":
        q = _unpack_int4(q).float()
        return (q.reshape(q.shape[0], scales.shape[1], -1) * scales.unsqueeze(-1)).reshape(q.shape)
    zp = tensors.get(f"{name}.zero_points")
    qf = q.float() - (zp.float().unsqueeze(1) if zp is not None else 0.0)
    return qf * scales.unsqueeze(1)


def quantized_tensors(model: nn.Module, names: list[str], scheme: str, backend: str) -> dict[str, torch.Tensor]:
    """The tensors that replace each quantized Linear's weight on disk."""
    out: dict[str, torch.Tensor] = {}
    if backend == "torch.ao":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=False)
        for n in names:
            w = q.get_submodule(n).weight()
            out[f"{n}.qweight"] = w.int_repr().contiguous()
            out[f"{n}.scales"] = w.q_per_channel_scales().float().contiguous()
            out[f"{n}.zero_points"] = w.q_per_channel_zero_points().to(torch.int32).contiguous()
        return out
    bits, group = (4, INT4_GROUP) if scheme == "int4-weight-only" else (8, None)
    for n in names:
        qw, scale = _absmax_int(model.get_submodule(n).weight.detach(), bits, group)
        out[f"{n}.qweight"] = _pack_int4(qw) if bits == 4 else qw.contiguous()
        out[f"{n}.scales"] = scale.contiguous()
    return out


def _import_torchao_quietly():
    """torchao announces at import that optional CUDA/Triton kernels are missing; irrelevant on CPU."""
    for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao  # noqa: F401


def _torchao_config(scheme: str):
    _import_torchao_quietly()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def materialize(model: nn.Module, tensors: dict[str, torch.Tensor], quant: dict) -> nn.Module:
    """Turn a freshly built fp32 model into the saved quantized one, in place."""
    scheme, backend, names = quant["scheme"], quant["backend"], list(quant["modules"])
    if quant.get("conv1d"):
        conv1d_to_linear(model)
    suffixes = (".qweight", ".scales", ".zero_points")
    plain = {k: v for k, v in tensors.items() if not k.endswith(suffixes)}
    for n in names:
        with torch.no_grad():
            model.get_submodule(n).weight.copy_(_dequantize(tensors, n, scheme))
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not any(k == f"{n}.weight" for n in names)]
    tied = {k for k in missing if k.endswith(("lm_head.weight", "decoder.weight", "decoder.bias"))}
    if unexpected or set(missing) - tied:
        raise ValueError(f"quantized checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "torch.ao":
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
            for n in names:
                mod = model.get_submodule(n)
                w = torch._make_per_channel_quantized_tensor(
                    tensors[f"{n}.qweight"], tensors[f"{n}.scales"].double(), tensors[f"{n}.zero_points"].long(), 0)
                mod.set_weight_bias(w, mod.bias())
        else:
            from torchao.quantization import quantize_

            wanted = set(names)
            quantize_(model, _torchao_config(scheme), filter_fn=lambda m, fqn: fqn in wanted)
    return model


# -- the stage -------------------------------------------------------------------------------------

def has_conv1d(model: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def resolve_backend(model: nn.Module, scheme: str, backend: str) -> tuple[str, str]:
    """(backend, format): format "transformers" (portable, TorchAoConfig) or "bigml" (storage.py)."""
    conv1d = has_conv1d(model)
    if backend == "auto":
        if conv1d:
            return ("torch.ao" if scheme == "int8-dynamic" else "torchao"), "bigml"
        return "torchao", "transformers"
    if backend == "torchao" and conv1d:
        raise ConfigError("quantize.backend", "torchao quantizes nn.Linear layers, and this model's are transformers' "
                          "Conv1D (GPT-2), which plain transformers could not reload quantized",
                          "use quantize.backend=auto (bigml's format, loads with bigml) or quantize.dtype=bf16")
    return backend, ("transformers" if backend == "torchao" else "bigml")


def plan(model: nn.Module, dtype: str, weight_only: bool, backend: str, fmt: str = "bigml",
         exclude: list[str] | None = None) -> dict:
    """The marker that goes into config.json (`bigml_quantization`), before any tensor is computed."""
    from bigml.models.architectures import count_params

    scheme = scheme_for(dtype, weight_only)
    marker = {"scheme": scheme, "params": count_params(model)}
    if scheme in ("bf16", "fp16"):
        return marker
    marker["conv1d"] = has_conv1d(model)
    marker["backend"] = backend
    marker["format"] = fmt
    marker["exclude"] = [str(p) for p in exclude or []]
    return marker


def _quantize_for_transformers(model: nn.Module, marker: dict) -> nn.Module:
    """torchao's quantize_ in place, with the quantizer transformers would have attached had it
    quantized the model while loading it (TorchAoConfig): save_pretrained then writes torchao's
    tensors and config.json's quantization_config, and `from_pretrained(dir)` rebuilds the same
    model. Output projections stay in floating point, as transformers' loader expects."""
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    scheme = marker["scheme"]
    names = target_linears(model, INT4_GROUP if scheme == "int4-weight-only" else None, marker.get("exclude"),
                           keep_output=True)
    if not names:
        raise ConfigError("quantize.dtype", f"{scheme}: the model has no Linear layer this scheme applies to")
    marker["modules"] = names
    wanted = set(names)
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wanted]
    config = _torchao_config(scheme)
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in wanted)
    qc = TorchAoConfig(config, modules_to_not_convert=skipped or None)
    model.config.quantization_config = qc
    model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    return model


def quantize_for_save(model: nn.Module, marker: dict) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """(the model to call save_pretrained on, the state dict to save, or None for its own)."""
    scheme = marker["scheme"]
    if scheme in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if scheme == "bf16" else torch.float16), None
    if marker.get("format") == "transformers":
        return _quantize_for_transformers(model, marker), None
    if marker.get("conv1d"):
        conv1d_to_linear(model)
    names = target_linears(model, INT4_GROUP if scheme == "int4-weight-only" else None, marker.get("exclude"))
    if not names:
        raise ConfigError("quantize.dtype", f"{scheme}: the model has no Linear layer this scheme applies to")
    marker["modules"] = names
    qt = quantized_tensors(model, names, scheme, marker["backend"])
    sd = {k: v for k, v in model.state_dict().items() if k not in {f"{n}.weight" for n in names}}
    sd.update(qt)
    return model, sd


def read_tensors(path: str, key: str = "model.path") -> dict[str, torch.Tensor]:
    """Every tensor of a bigml-quantized model directory's safetensors files."""
    from pathlib import Path

    from safetensors.torch import load_file

    from bigml.errors import DataError

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise DataError(f"{key}={path}: a bigml-quantized model needs its model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors
