"""`bigml export`: ONNX checked against PyTorch by onnxruntime, GGUF read back by transformers'
GGUF loader, and the refusals (exit 2, naming what is supported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_FT, TINY_GPT, TINY_LLAMA, TINY_RUN

TEXTS = ["good great day", "the movie was awful and sad", "a"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus, cache_dir, labeled_csv):
    from bigml.cli import main

    root = tmp_path_factory.mktemp("export-models")
    env = {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CI": "1"}
    run = [*TINY_RUN, "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
           f"data.path={corpus}"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["pretrain", *TINY_GPT, *run, "model.num_layers=2", f"hydra.run.dir={root / 'gpt'}"]) == 0
        assert main(["pretrain", *TINY_LLAMA, *run, "model.num_layers=2", f"hydra.run.dir={root / 'llama'}"]) == 0
        assert main(["pretrain", *TINY_GPT, *run, "tokenizer=char", "tokenizer.vocab_size=64", f"hydra.run.dir={root / 'char'}"]) == 0
        assert main(["finetune", *TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=1", f"hydra.run.dir={root / 'cls'}"]) == 0
    return {name: root / name / "model" for name in ("gpt", "llama", "char", "cls")}


def export(cli, model: Path, out: Path, *args):
    return cli("export", f"model.path={model}", f"output={out}", "measure.batch_size=2", "measure.seq_len=16",
               "measure.repeats=2", *args)


def _ort_logits(out: Path, batch) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(["logits"], {n: batch[n].numpy() for n in names})[0]


def test_onnx_classifier_matches_pytorch(cli, models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "cls-onnx"
    r = export(cli, models["cls"], out, "format=onnx")
    assert r.code == 0, r.err
    assert {"model.onnx", "config.json", "tokenizer.json", "README.md", "export.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["exporter"] == "dynamo"
    assert report["latency"]["torch_ms"] > 0 and report["latency"]["onnxruntime_ms"] > 0
    assert "onnxruntime" in r.err and "max |logit diff|" in r.err
    # independently of bigml's own check: real texts, padded together, through both runtimes
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    np.testing.assert_allclose(_ort_logits(out, batch), expected, atol=1e-4)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: onnx") and "onnxruntime" in card and str(models["cls"]) in card


@pytest.mark.parametrize("name, exporter", [("llama", "dynamo"), ("gpt", "torchscript")])
def test_onnx_causal_lm_matches_pytorch_on_padded_batches(cli, models, tmp_path, name, exporter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"{name}-onnx"
    r = export(cli, models[name], out, "format=onnx", f"onnx.exporter={exporter}")
    assert r.code == 0, r.err
    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    batch = tok(["The cat sees a dog", "A"], padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(models[name]).eval()
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits.numpy()
    got = _ort_logits(out, batch)
    keep = batch["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_gguf_f32_reloads_into_transformers_with_identical_logits(cli, models, tmp_path, name):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"{name}-gguf"
    r = export(cli, models[name], out, "format=gguf")
    assert r.code == 0, r.err
    src = AutoModelForCausalLM.from_pretrained(models[name]).eval()
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    # the tensor names are llama.cpp's, as gguf-py's own table maps the transformers names
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[src.config.model_type]
    table = gguf.get_tensor_name_map(arch, src.config.num_hidden_layers)
    expected_names = {f"{table.get_name(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}" for k in src.state_dict()
                      if table.get_name(k.rsplit(".", 1)[0]) and not k.startswith("lm_head")}
    assert {t.name for t in reader.tensors} == expected_names
    kw = {}
    if name == "gpt":  # transformers does not read these two GPT-2 sizes from GGUF (see bigml/export/gguf.py)
        kw = {"n_positions": src.config.n_positions, "n_inner": src.config.n_inner}
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", **kw).eval()
    ids = torch.randint(5, src.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # GPT-2's layer-norm epsilon is stored as a float32 in GGUF (1e-5 -> 9.99999974e-06)
        torch.testing.assert_close(model(input_ids=ids).logits, src(input_ids=ids).logits, atol=1e-6, rtol=0)
    tok, tok2 = AutoTokenizer.from_pretrained(models[name]), AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for s in ["The cat sees\ta dog.\n", "  héllo wörld ✓", "x"]:
        assert tok(s)["input_ids"] == tok2(s)["input_ids"]
    assert json.loads((out / "export.json").read_text())["parity"]["max_abs_diff"] <= 1e-6
    assert "llama-cli" in (out / "README.md").read_text()


def test_gguf_q8_0_is_smaller_and_close(cli, models, tmp_path):
    f32, q8 = tmp_path / "f32", tmp_path / "q8"
    assert export(cli, models["llama"], f32, "format=gguf").code == 0
    r = export(cli, models["llama"], q8, "format=gguf", "gguf.dtype=q8_0")
    assert r.code == 0, r.err
    assert (q8 / "model.gguf").stat().st_size < (f32 / "model.gguf").stat().st_size
    parity = json.loads((q8 / "export.json").read_text())["parity"]
    assert 0 < parity["max_abs_diff"] <= 0.2 * max(1.0, parity["max_abs_logit"])


@pytest.mark.parametrize("model, args, needle", [
    ("cls", ["format=gguf"], "llama and gpt2 families"),
    ("char", ["format=gguf"], "tokenizer"),
    ("gpt", ["format=tflite"], "choose one of onnx, gguf"),
    ("gpt", ["format=gguf", "gguf.dtype=q4_k"], "gguf.dtype"),
    ("gpt", ["format=onnx", "onnx.exporter=tracer"], "onnx.exporter"),
])
def test_unsupported_combinations_exit_2_naming_what_is_supported(cli, models, tmp_path, model, args, needle):
    out = tmp_path / "out"
    r = export(cli, models[model], out, *args)
    assert r.code == 2, r.err
    assert needle in r.err and len(r.err.strip().splitlines()[-1]) < 300
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_existing_output_is_never_overwritten(cli, models, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = export(cli, models["gpt"], out, "format=onnx")
    assert r.code == 2 and "not empty" in r.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
