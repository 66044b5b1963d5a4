"""bigml pretrain end to end on tiny models: objectives, data formats, export, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY_BERT, TINY_GPT, TINY_LLAMA, TINY_RUN, make_corpus

METRIC_KEYS = {"train_loss", "val_loss", "val_perplexity", "step", "tokens_seen", "tokens_per_sec", "wall_time_s", "status"}


def pretrain(cli, run_dir: Path, *args):
    return cli("pretrain", *TINY_RUN, f"hydra.run.dir={run_dir}", *args)


@pytest.mark.parametrize("model, auto", [(TINY_GPT, "AutoModelForCausalLM"), (TINY_BERT, "AutoModelForMaskedLM"),
                                         (TINY_LLAMA, "AutoModelForCausalLM")])
def test_pretrain_trains_and_exports_a_transformers_model(cli, corpus, tmp_path, model, auto):
    import transformers

    run = tmp_path / "run"
    r = pretrain(cli, run, *model, f"data.path={corpus}")
    assert r.code == 0, r.err
    m = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["status"] == "completed" and m["step"] == 12
    assert m["val_loss"] < m["val_loss_initial"] - 0.5, m  # learned something
    assert m["tokens_seen"] == 12 * 8 * 32
    assert (run / ".hydra" / "config.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.ckpt").exists()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (run / "model" / f).exists(), f

    # plain transformers loads it and reproduces bigml's logits
    from bigml.models.language_model import LanguageModel

    hf = getattr(transformers, auto).from_pretrained(run / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run / "model")
    ids = tok(["The cat sees the red stone. A dog moves slowly."], return_tensors="pt")["input_ids"]
    module = LanguageModel.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        ours, theirs = module.model(input_ids=ids).logits, hf(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_objective_follows_the_architecture(cli, corpus, tmp_path):
    r = pretrain(cli, tmp_path / "b", *TINY_BERT, f"data.path={corpus}")
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert r.code == 0 and m["objective"] == "masked" and "val_accuracy" in m
    tok = json.loads((tmp_path / "b" / "model" / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "WordPiece"
    assert "[MASK]" in tok["model"]["vocab"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "glob", "single-file"])
def test_data_formats(cli, tmp_path, fmt):
    import pandas as pd

    texts = [p.read_text() for p in sorted(make_corpus(tmp_path / "txt", n_docs=60).glob("*.txt"))]
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
        extra = ["data.text_column=body"]
    elif fmt == "csv":
        path = tmp_path / "c.csv"
        pd.DataFrame({"text": texts, "n": range(len(texts))}).to_csv(path, index=False)
        extra = []
    elif fmt == "parquet":
        path = tmp_path / "c.parquet"
        pd.DataFrame({"text": texts}).to_parquet(path)
        extra = []
    elif fmt == "glob":
        path = f"{tmp_path}/txt/doc00*.txt"
        extra = []
    else:
        path = tmp_path / "all.txt"
        path.write_text("\n\n".join(texts))
        extra = ["data.val_fraction=0.1"]
    r = pretrain(cli, tmp_path / "run", *TINY_GPT, f"data.path={path}", "trainer.max_steps=4", *extra)
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "completed"


def test_char_tokenizer(cli, corpus, tmp_path):
    r = pretrain(cli, tmp_path / "run", *TINY_GPT, f"data.path={corpus}", "tokenizer=char")
    assert r.code == 0, r.err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    ids = tok("Cat sees.")["input_ids"]
    assert len(ids) == len("Cat sees.")
    assert tok.decode(ids) == "Cat sees."


def test_continue_pretraining_from_model_path(cli, corpus, tmp_path):
    assert pretrain(cli, tmp_path / "a", *TINY_GPT, f"data.path={corpus}").code == 0
    before = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    r = pretrain(cli, tmp_path / "b", f"model.path={tmp_path / 'a' / 'model'}", f"data.path={corpus}")
    assert r.code == 0, r.err
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["val_loss_initial"] == pytest.approx(a["val_loss"], rel=0.05)  # starts where `a` ended
    assert (tmp_path / "a" / "model" / "model.safetensors").read_bytes() == before  # input untouched


def test_dry_run_builds_everything_and_trains_nothing(cli, corpus, tmp_path):
    r = pretrain(cli, tmp_path / "run", *TINY_GPT, f"data.path={corpus}", "dry_run=true")
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "dry_run" and m["train_blocks"] > 0
    assert not (tmp_path / "run" / "model").exists()


# -- bad input ---------------------------------------------------------------------------------

def _bad(cli, tmp_path, *args):
    r = pretrain(cli, tmp_path / "run", *TINY_GPT, *args)
    assert r.code == 2, r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "run" / "metrics.json").exists()
    return r.err


def test_empty_corpus(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    assert "holds no non-empty text" in _bad(cli, tmp_path, f"data.path={tmp_path / 'empty'}")


def test_directory_without_text_files(cli, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG")
    assert "holds no" in _bad(cli, tmp_path, f"data.path={tmp_path / 'imgs'}")


def test_glob_matching_nothing(cli, tmp_path):
    assert "the glob matches no files" in _bad(cli, tmp_path, f"data.path={tmp_path}/*.txt")


def test_binary_file(cli, tmp_path):
    f = tmp_path / "blob.txt"
    f.write_bytes(os.urandom(2000) + b"\x00" * 10)
    assert "looks like a binary file" in _bad(cli, tmp_path, f"data.path={f}")


def test_wrong_encoding_names_the_file_and_the_fix(cli, tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("café crème brûlée\n".encode("latin-1") * 50)
    err = _bad(cli, tmp_path, f"data.path={f}")
    assert "latin.txt: not valid utf-8" in err and "data.encoding" in err


def test_corpus_too_small_for_block_size(cli, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("one two three")
    assert "too few for data.block_size" in _bad(cli, tmp_path, f"data.path={f}")


def test_tokenizer_that_does_not_match_the_model(cli, corpus, tmp_path):
    assert pretrain(cli, tmp_path / "a", *TINY_GPT, f"data.path={corpus}").code == 0
    assert pretrain(cli, tmp_path / "big", *TINY_GPT, f"data.path={corpus}", "tokenizer.vocab_size=600",
                    "trainer.max_steps=2").code == 0
    err = _bad(cli, tmp_path, f"model.path={tmp_path / 'a' / 'model'}", f"tokenizer.path={tmp_path / 'big' / 'model'}",
               f"data.path={corpus}")
    assert "embeddings" in err and "tokenizer" in err


def test_model_path_without_config(cli, corpus, tmp_path):
    (tmp_path / "notamodel").mkdir()
    assert "no config.json" in _bad(cli, tmp_path, f"model.path={tmp_path / 'notamodel'}", f"data.path={corpus}")


def test_existing_run_is_never_overwritten(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert pretrain(cli, run, *TINY_GPT, f"data.path={corpus}").code == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    r = pretrain(cli, run, *TINY_GPT, f"data.path={corpus}")
    assert r.code == 2 and "already holds a run" in r.err and "resume=" in r.err
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_unwritable_output_directory(cli, corpus, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/bigml-run"  # root can write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    r = cli("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", f"hydra.run.dir={target}")
    assert r.code == 2, r.err
    assert "Traceback" not in r.err
    assert "hydra.run.dir" in r.err or "BIGML_OUTPUT_ROOT" in r.err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_projection_and_loss_equal_transformers(arch, bf16, monkeypatch):
    """bigml.models.fused_loss (chunked, gradients in the forward pass) against transformers' own
    loss: the same loss and the same gradient for every parameter (fp32 to rounding; bf16 to
    bf16's rounding of the logits' gradient)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from bigml.models import fused_loss

    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", 40)  # several chunks, the last one short
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))
    model.eval()  # dropout off: both passes see the same network
    ids = torch.randint(0, 300, (3, 33))
    grads = []
    for fn in (lambda: model(input_ids=ids, labels=ids).loss, lambda: fused_loss.causal_lm_loss(model, ids)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref), (loss, got) = grads
    assert loss == pytest.approx(ref_loss, abs=1e-5 if not bf16 else 1e-3)
    tol = 1e-5 if not bf16 else 2e-2
    for name in ref:
        scale = float(ref[name].abs().max()) + 1e-12
        assert float((got[name] - ref[name]).abs().max()) / scale < tol, name
    model.compile()
    assert fused_loss.causal_lm_loss(model, ids) is None  # a compiled model keeps its own (compiled) forward
