"""GGUF export (the file llama.cpp, ollama and LM Studio read) of Llama- and GPT-2-family causal LMs.

Written with the `gguf` package's GGUFWriter: metadata keys, the tokenizer, and the tensors under
llama.cpp's names (the table gguf-py's `get_tensor_name_map` holds, which transformers' GGUF
loader reads back). What a converter must get right, and is tested by reloading the file into
transformers and comparing logits:

  - Llama: q and k projection rows reordered for llama.cpp's interleaved RoPE (k with the number
    of key/value heads); no `output.weight` when the embeddings are tied (its absence is how readers
    know they are tied)
  - GPT-2: transformers' Conv1D layers store (in, out); GGUF wants (out, in)
  - the tokenizer: byte-level BPE (GPT-2 style, every bigml-trained BPE) as model "gpt2",
    sentencepiece-style BPE with byte fallback as model "llama"; `add_bos_token` written explicitly
    (readers assume one for "llama" otherwise)

llama.cpp's own converter (convert_hf_to_gguf.py) is a script in its repository, not an installable
package, hence this writer of the two families bigml trains.

dtype: f32 (exact), f16 (2-D weights in half precision), q8_0 (llama.cpp's 8-bit blocks of 32);
1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bigml.errors import DataError

FAMILIES = ("llama", "gpt2")
DTYPES = ("f32", "f16", "q8_0")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half row order of q/k -> llama.cpp's interleaved order, per head
    (transformers' GGUF loader applies the inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(model) -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
    c, sd = model.config, model.state_dict()
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", permute_qk(sd[p + "self_attn.q_proj.weight"].numpy(), c.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", permute_qk(sd[p + "self_attn.k_proj.weight"].numpy(), c.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


_GPT2_BLOCK = (("ln_1", "attn_norm", False), ("attn.c_attn", "attn_qkv", True), ("attn.c_proj", "attn_output", True),
               ("ln_2", "ffn_norm", False), ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True))


def _gpt2_tensors(model) -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
    c, sd = model.config, model.state_dict()
    yield "token_embd.weight", sd["transformer.wte.weight"]
    yield "position_embd.weight", sd["transformer.wpe.weight"]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for hf, name, conv1d in _GPT2_BLOCK:
            w = sd[p + hf + ".weight"]
            yield f"blk.{i}.{name}.weight", (w.T if conv1d else w)
            yield f"blk.{i}.{name}.bias", sd[p + hf + ".bias"]
    yield "output_norm.weight", sd["transformer.ln_f.weight"]
    yield "output_norm.bias", sd["transformer.ln_f.bias"]
    if not getattr(c, "tie_word_embeddings", True):
        yield "output.weight", sd["lm_head.weight"]


def tokenizer_kind(tokenizer) -> str | None:
    """"gpt2" (byte-level BPE), "llama" (BPE with byte fallback), or None (no GGUF equivalent)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    tj = json.loads(backend.to_str())
    model, pre = tj.get("model") or {}, json.dumps(tj.get("pre_tokenizer") or {})
    if model.get("type") != "BPE":
        return None
    if "ByteLevel" in pre:
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    return None


def check_supported(config, tokenizer) -> None:
    """DataError (exit 2) naming what GGUF export supports."""
    family = config.model_type
    archs = list(getattr(config, "architectures", None) or [])
    if family not in FAMILIES or not (archs and archs[0].endswith(("ForCausalLM", "LMHeadModel"))):
        raise DataError(f"format=gguf supports causal LMs of the llama and gpt2 families; this is a {family} model "
                        f"({archs[0] if archs else 'no head'}): use format=onnx")
    if getattr(config, "quantization_config", None) or getattr(config, "bigml_quantization", None):
        raise DataError("format=gguf: the model is quantized; export the unquantized model (gguf.dtype=q8_0 "
                        "quantizes for llama.cpp)")
    if tokenizer_kind(tokenizer) is None:
        raise DataError("format=gguf supports byte-level BPE (GPT-2 style) and sentencepiece-style BPE tokenizers; "
                        "this model's tokenizer is neither (a character or WordPiece tokenizer has no GGUF form)")


def _tokenizer_metadata(writer, tokenizer, kind: str) -> None:
    from gguf import TokenType

    backend = tokenizer.backend_tokenizer
    tj = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre("gpt-2")
        types = [TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(n)]
    else:
        # llama.cpp merges sentencepiece pieces by score: earlier (more frequent) pieces score higher
        writer.add_token_scores([0.0 if (i in special or tokens[i].startswith("<0x")) else -float(i) for i in range(n)])
        types = []
        for i, t in enumerate(tokens):
            if i == tokenizer.unk_token_id:
                types.append(TokenType.UNKNOWN)
            elif i in special:
                types.append(TokenType.CONTROL)
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
        writer.add_add_space_prefix(True)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if merges:
        writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id),
                     ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    ids = tokenizer("a")["input_ids"]  # what the source tokenizer really adds, written down explicitly
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export(model, tokenizer, path: Path, dtype: str = "f32", name: str = "model") -> dict:
    """Write `path` (a .gguf file); returns what it holds (tensors, family, dtype)."""
    import gguf
    from gguf import GGMLQuantizationType, LlamaFileType

    c = model.config
    family = c.model_type
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(name)
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype])
    if family == "llama":
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_dimension_count(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        rope = getattr(c, "rope_parameters", None) or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        tensors = _llama_tensors(model)
    else:
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        tensors = _gpt2_tensors(model)
    _tokenizer_metadata(writer, tokenizer, tokenizer_kind(tokenizer))
    count = 0
    for tname, t in tensors:
        a = np.ascontiguousarray(t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32))
        if a.ndim == 1 or dtype == "f32":
            writer.add_tensor(tname, a.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(tname, a.astype(np.float16))
        elif a.shape[-1] % 32:  # q8_0 blocks are rows of 32: a narrower row stays f16
            writer.add_tensor(tname, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, GGMLQuantizationType.Q8_0)
            writer.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"family": family, "dtype": dtype, "tensors": count, "tokenizer": tokenizer_kind(tokenizer)}


def reload(directory: Path, filename: str):
    """(model, tokenizer) read back from the GGUF file by transformers (which dequantizes to fp32)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    fields = gguf.GGUFReader(str(directory / filename)).fields
    if "gpt2.context_length" in fields:  # transformers' GGUF loader does not map these two of GPT-2's
        kw["n_positions"] = int(fields["gpt2.context_length"].contents())  # (it sets n_ctx, which GPT2Config ignores)
        kw["n_inner"] = int(fields["gpt2.feed_forward_length"].contents())
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
