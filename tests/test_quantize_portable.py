"""Quantized models that load anywhere: `bigml compress method=quantize` saves torchao's int8 / int4
through transformers' TorchAoConfig, so plain `AutoModelFor*.from_pretrained` (no bigml code, in a
fresh process) loads them and reproduces the metric compress reported. Modules named in
quantize.exclude stay in floating point; GPT-2's Conv1D layers keep bigml's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_FT, TINY_GPT, TINY_LLAMA, TINY_RUN, make_labeled

MEASURE = ["measure.batch_size=2", "measure.seq_len=16", "measure.warmup=1", "measure.repeats=2"]

# Accuracy on test.csv with nothing but transformers and torch: the independent computation.
PLAIN = r"""
import csv, json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_dir, test_csv = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
rows = list(csv.DictReader(open(test_csv)))
hits = 0
with torch.no_grad():
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        batch = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1).tolist()
        hits += sum(model.config.id2label[p] == r["label"] for p, r in zip(pred, chunk))
kinds = {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
print(json.dumps({"accuracy": hits / len(rows), "kinds": kinds, "bigml_imported": "bigml" in sys.modules}))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qdata")
    return {"train": make_labeled(root / "train.csv", 240, seed=1), "test": make_labeled(root / "test.csv", 80, seed=2)}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, cache_dir, data) -> Path:
    """A 2-layer BERT classifier finetuned by bigml (so accuracy is above chance)."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("qcls")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        assert main(["finetune", *TINY_FT, "model.num_layers=2", f"data.path={data['train']}",
                     f"data.test_path={data['test']}", "trainer.max_epochs=4", f"hydra.run.dir={root / 'run'}"]) == 0
    return root / "run" / "model"


@pytest.fixture(scope="module")
def lms(tmp_path_factory, corpus, cache_dir) -> dict:
    from bigml.cli import main

    root = tmp_path_factory.mktemp("qlm")
    run = [*TINY_RUN, "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
           f"data.path={corpus}"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        assert main(["pretrain", *TINY_LLAMA, *run, "model.num_layers=2", f"hydra.run.dir={root / 'llama'}"]) == 0
        assert main(["pretrain", *TINY_GPT, *run, f"hydra.run.dir={root / 'gpt'}"]) == 0
    return {"llama": root / "llama" / "model", "gpt": root / "gpt" / "model"}


def plain_transformers(model_dir: Path, test_csv: Path, env: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", PLAIN, str(model_dir), str(test_csv)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cls(data) -> list[str]:
    return ["data=labeled", f"data.path={data['train']}", f"data.test_path={data['test']}", "data.max_length=64",
            "eval.batch_size=16", *MEASURE]


def test_int8_loads_in_plain_transformers_with_the_metric_compress_reported(cli, env, tmp_path, classifier, data):
    run = tmp_path / "q"
    r = cli("compress", "method=quantize", f"model.path={classifier}", f"hydra.run.dir={run}", *_cls(data))
    assert r.code == 0, r.err
    m = r.metrics(run)
    stage = m["stages"][0]
    assert stage["backend"] == "torchao" and stage["format"] == "transformers" and stage["scheme"] == "int8-dynamic"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert m["after"]["linear_mb"] * 3 < m["before"]["linear_mb"]
    plain = plain_transformers(run / "model", data["test"], env)
    assert not plain["bigml_imported"]
    assert plain["accuracy"] == pytest.approx(m["after"]["accuracy"], abs=1e-9)  # the same rows, the same numbers
    assert set(plain["kinds"].values()) == {"Int8Tensor"}  # every Linear reloaded as int8 (no random init)
    assert m["before"]["accuracy"] > 0.6  # a model that learned something, so agreement means something
    card = (run / "model" / "README.md").read_text()
    assert "torchao" in card and "accuracy" in card and "bigml compress" in card

    # bigml's own readers load it too
    ev = tmp_path / "eval"
    r = cli("eval", f"model.path={run / 'model'}", f"hydra.run.dir={ev}", *_cls(data)[:5])
    assert r.code == 0, r.err
    assert r.metrics(ev)["accuracy"] == pytest.approx(m["after"]["accuracy"], abs=1e-9)


def test_excluded_modules_stay_float_and_int4_is_portable_too(cli, env, tmp_path, classifier, data):
    run = tmp_path / "x"
    r = cli("compress", "method=quantize", f"model.path={classifier}", f"hydra.run.dir={run}",
            "quantize.exclude=[classifier,pooler.dense]", *_cls(data))
    assert r.code == 0, r.err
    kinds = plain_transformers(run / "model", data["test"], env)["kinds"]
    assert kinds["classifier"] == "Parameter" and kinds["bert.pooler.dense"] == "Parameter"
    assert {v for k, v in kinds.items() if k not in ("classifier", "bert.pooler.dense")} == {"Int8Tensor"}
    assert r.metrics(run)["stages"][0]["exclude"] == ["classifier", "pooler.dense"]

    run4 = tmp_path / "int4"
    r = cli("compress", "method=quantize", "quantize.dtype=int4", f"model.path={classifier}", f"hydra.run.dir={run4}",
            *_cls(data))
    assert r.code == 0, r.err
    plain = plain_transformers(run4 / "model", data["test"], env)
    assert plain["accuracy"] == pytest.approx(r.metrics(run4)["after"]["accuracy"], abs=1e-9)
    assert "IntxUnpackedToInt8Tensor" in plain["kinds"].values()


def test_llama_int8_weight_only_is_read_by_transformers_and_every_bigml_command(cli, tmp_path, lms, corpus):
    import torch
    from transformers import AutoModelForCausalLM

    from bigml.models.loading import load_model

    run = tmp_path / "lm"
    r = cli("compress", "method=quantize", "quantize.weight_only=true", f"model.path={lms['llama']}",
            f"hydra.run.dir={run}", "data=text", f"data.path={corpus}", "data.block_size=32", "eval.max_batches=2",
            "eval.batch_size=8", *MEASURE)
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["stages"][0]["format"] == "transformers" and m["after"]["perplexity"] > 0
    plain = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ours, _ = load_model(str(run / "model"))
    ids = torch.randint(5, 200, (2, 20))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert type(plain.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(plain.lm_head.weight).__name__ in ("Parameter", "Tensor")  # output projection kept in float
    r = cli("generate", f"model.path={run / 'model'}", "prompt=the cat", "max_new_tokens=4")
    assert r.code == 0, r.err
    ev = tmp_path / "ev"
    r = cli("eval", f"model.path={run / 'model'}", f"hydra.run.dir={ev}", "data=text", f"data.path={corpus}",
            "data.block_size=32", "eval.max_batches=2", "eval.batch_size=8", "eval.split=val")
    assert r.code == 0, r.err


def test_gpt2_conv1d_keeps_bigml_format_under_auto_and_torchao_is_refused(cli, tmp_path, lms, corpus):
    lm = ["data=text", f"data.path={corpus}", "data.block_size=32", "eval.max_batches=2", "eval.batch_size=8", *MEASURE]
    run = tmp_path / "gpt"
    r = cli("compress", "method=quantize", f"model.path={lms['gpt']}", f"hydra.run.dir={run}", *lm)
    assert r.code == 0, r.err
    stage = r.metrics(run)["stages"][0]
    assert stage["format"] == "bigml" and stage["backend"] == "torch.ao" and "Conv1D" in stage["note"]
    r = cli("compress", "method=quantize", "quantize.backend=torchao", f"model.path={lms['gpt']}",
            f"hydra.run.dir={tmp_path / 'refused'}", *lm)
    assert r.code == 2 and "Conv1D" in r.err and "quantize.backend" in r.err
    assert not (tmp_path / "refused" / "model").exists()
