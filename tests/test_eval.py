"""bigml eval and the bigml.evaluation API: task metrics, LM metrics, gates, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import _FILL, _NEG, _POS, TINY_BERT, TINY_GPT, TINY_RUN, make_labeled


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight heads (classification, regression, token) sharing one WordPiece tokenizer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertTokenizerFast,
    )

    root = tmp_path_factory.mktemp("eval-models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(_POS + _NEG + _FILL))]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    small = dict(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64)
    out = {}
    for name, cls, extra in [
        ("cls", BertForSequenceClassification, dict(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})),
        ("reg", BertForSequenceClassification, dict(num_labels=1, problem_type="regression")),
        ("tok", BertForTokenClassification, dict(num_labels=3, id2label={0: "O", 1: "B-NEG", 2: "B-POS"},
                                                  label2id={"O": 0, "B-NEG": 1, "B-POS": 2})),
    ]:
        cls(BertConfig(**small, **extra)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return out | {"cls": root / "cls", "reg": root / "reg", "tok": root / "tok"}


def evaluate(cli, run: Path, *args):
    return cli("eval", f"hydra.run.dir={run}", *args)


def read(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_classification_metrics_report_and_plot(cli, models, labeled_csv, tmp_path):
    r = evaluate(cli, tmp_path / "e", f"model.path={models['cls']}", f"data.path={labeled_csv}", "eval.predictions=true")
    assert r.code == 0, r.err
    m = read(tmp_path / "e")
    for k in ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "ece", "loss"):
        assert 0 <= m[k] <= (10 if k == "loss" else 1), k
    assert m["examples"] == 200 and m["task"] == "classification"
    rep = json.loads((tmp_path / "e" / "report.json").read_text())
    assert sum(map(sum, rep["confusion_matrix"])) == 200 and [c["label"] for c in rep["per_class"]] == ["neg", "pos"]
    assert (tmp_path / "e" / "confusion_matrix.png").exists()
    assert "confusion matrix" in r.err and "per class" in r.err
    assert len((tmp_path / "e" / "predictions.jsonl").read_text().splitlines()) == 200


def test_regression_and_token_metrics(cli, models, labeled_csv, tmp_path):
    r = evaluate(cli, tmp_path / "r", f"model.path={models['reg']}", f"data.path={labeled_csv}", "data.label_column=score")
    assert r.code == 0, r.err
    m = read(tmp_path / "r")
    assert {"mse", "mae", "rmse", "r2", "pearson", "spearman"} <= set(m) and m["task"] == "regression"
    r = evaluate(cli, tmp_path / "t", f"model.path={models['tok']}", f"data.path={labeled_csv}", "data.label_column=ner")
    assert r.code == 0, r.err
    m = read(tmp_path / "t")
    assert {"precision", "recall", "f1", "token_accuracy"} <= set(m) and m["task"] == "token"


def test_entity_spans_match_bio_rules():
    from bigml.evaluation import EntitySpans

    spans = EntitySpans.spans
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    assert spans(["I-PER", "I-PER", "B-PER"]) == {(0, 2, "PER"), (2, 3, "PER")}
    assert spans(["B-PER", "I-LOC"]) == {(0, 1, "PER"), (1, 2, "LOC")}
    metric = EntitySpans({0: "O", 1: "B-PER", 2: "I-PER"})
    gold = torch.tensor([[-100, 1, 2, 0, 1, -100]])
    pred = torch.tensor([[0, 1, 2, 0, 0, 0]])  # one of two entities found, none wrong
    metric.update(pred, gold)
    out = metric.compute()
    assert out["precision"] == 1 and out["recall"] == 0.5 and abs(out["f1"] - 2 / 3) < 1e-9


def test_gates_exit_codes(cli, models, labeled_csv, tmp_path):
    common = [f"model.path={models['cls']}", f"data.path={labeled_csv}"]
    r = evaluate(cli, tmp_path / "fail", *common, "eval.fail_below.accuracy=1.01")
    assert r.code == 1 and "gate failed: accuracy" in r.err and "Traceback" not in r.err
    assert read(tmp_path / "fail")["status"] == "gate_failed"
    r = evaluate(cli, tmp_path / "pass", *common, "eval.fail_below.accuracy=0.01", "eval.fail_above.loss=100")
    assert r.code == 0, r.err
    assert read(tmp_path / "pass")["gate"].startswith("passed")
    r = evaluate(cli, tmp_path / "above", *common, "eval.fail_above.loss=0.001")
    assert r.code == 1 and "loss" in r.err
    r = evaluate(cli, tmp_path / "wrong", *common, "eval.fail_below.r2=0.5")  # not a classification metric
    assert r.code == 2 and "has no metric r2" in r.err
    r = evaluate(cli, tmp_path / "typo", *common, "eval.fail_below.acuracy=0.5")
    assert r.code == 2 and "accuracy" in r.err


@pytest.fixture(scope="module")
def lms(tmp_path_factory, corpus) -> dict[str, Path]:
    from bigml.cli import main

    root = tmp_path_factory.mktemp("lms")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root), "BIGML_CACHE_DIR": str(root / "cache"), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        for name, model in (("gpt", TINY_GPT), ("bert", TINY_BERT)):
            assert main(["pretrain", *TINY_RUN, *model, "trainer.max_steps=4", f"data.path={corpus}",
                         f"hydra.run.dir={root / name}"]) == 0
    return {"gpt": root / "gpt" / "model", "bert": root / "bert" / "model"}


def test_language_model_metrics(cli, lms, corpus, tmp_path):
    r = evaluate(cli, tmp_path / "g", f"model.path={lms['gpt']}", "data=text", f"data.path={corpus}",
                 "eval.max_length=32", "eval.max_batches=3")
    assert r.code == 0, r.err
    m = read(tmp_path / "g")
    assert m["task"] == "causal_lm" and m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-3)
    assert 0 < m["bits_per_byte"] < 20
    for name in ("b1", "b2"):
        r = evaluate(cli, tmp_path / name, f"model.path={lms['bert']}", "data=text", f"data.path={corpus}",
                     "eval.max_length=32", "eval.max_batches=3")
        assert r.code == 0, r.err
    assert (tmp_path / "b1" / "metrics.json").read_text() == (tmp_path / "b2" / "metrics.json").read_text()
    m = read(tmp_path / "b1")
    assert m["task"] == "masked_lm" and {"loss", "accuracy", "perplexity", "bits_per_byte"} <= set(m)


def test_evaluate_model_api_on_a_quantized_model(models, labeled_csv):
    """What compress does: score an in-memory (here dynamically quantized) model, same keys as eval."""
    from hydra import compose, initialize_config_dir

    from bigml.cli import _config_dir
    from bigml.evaluation import evaluate_model, load_model_for_eval

    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose("eval", [f"model.path={models['cls']}", f"data.path={labeled_csv}", "eval.batch_size=64"])
    model, tok, task = load_model_for_eval(cfg.model.path, cfg)
    assert task.name == "classification"
    before = evaluate_model(model, tok, cfg, split="all")
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    after = evaluate_model(q, tok, cfg, split="all")
    assert set(before) == set(after) and after["examples"] == 200
    assert abs(before["accuracy"] - after["accuracy"]) < 0.2


# -- bad input ---------------------------------------------------------------------------------

def _bad(cli, tmp_path, *args) -> str:
    r = evaluate(cli, tmp_path / "run", *args)
    assert r.code == 2, r.err
    assert "Traceback" not in r.err
    return r.err.strip().splitlines()[-1]


def test_classification_head_on_regression_data(cli, models, labeled_csv, tmp_path):
    err = _bad(cli, tmp_path, f"model.path={models['cls']}", f"data.path={labeled_csv}", "data.label_column=score")
    assert "classification head" in err and "regression" in err


def test_regression_task_on_a_classification_head(cli, models, labeled_csv, tmp_path):
    err = _bad(cli, tmp_path, f"model.path={models['cls']}", f"data.path={labeled_csv}", "task=regression")
    assert "cannot be scored as regression" in err


def test_labels_the_model_does_not_know(cli, models, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\ngood day,pos\nso so day,neutral\n")
    err = _bad(cli, tmp_path, f"model.path={models['cls']}", f"data.path={f}")
    assert "neutral" in err and "the model knows neg, pos" in err


def test_model_without_tokenizer_and_missing_model(cli, models, labeled_csv, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(models["cls"] / f, bare / f)
    assert "no tokenizer files" in _bad(cli, tmp_path, f"model.path={bare}", f"data.path={labeled_csv}")
    assert "model.path: required" in _bad(cli, tmp_path, f"data.path={labeled_csv}")


def test_overlong_texts_are_truncated_and_counted(cli, models, tmp_path):
    data = make_labeled(tmp_path / "d.csv", n=40)
    r = evaluate(cli, tmp_path / "e", f"model.path={models['cls']}", f"data.path={data}", "eval.max_length=6")
    assert r.code == 0, r.err
    assert "texts are longer than 6 tokens and were truncated" in r.err


def test_language_model_on_labeled_data_and_classifier_on_corpus(cli, models, lms, labeled_csv, corpus, tmp_path):
    assert "text corpus" in _bad(cli, tmp_path, f"model.path={lms['gpt']}", f"data.path={labeled_csv}")
    err = _bad(cli, tmp_path, f"model.path={models['cls']}", "data=text", f"data.path={corpus}")
    assert "labeled" in err or "corpus" in err
