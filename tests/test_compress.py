"""bigml compress end to end on tiny models: each method, the chain, reload by `bigml eval`,
the input left untouched, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import TINY_GPT, TINY_RUN

MEASURE = ["measure.batch_size=2", "measure.seq_len=16", "measure.warmup=1", "measure.repeats=2"]
TRAIN = ["data.batch_size=8", "optimizer.lr=3e-3", "trainer.log_every_n_steps=1", "trainer.precision=32-true"]
LABELS = ("negative", "neutral", "positive")
_CUE = {"negative": ["awful", "sad", "bad", "hate"], "neutral": ["table", "chair", "paper", "window"],
        "positive": ["great", "happy", "good", "love"]}
_FILLER = "the a this that my your some one day time people thing place".split()


def _tweets(path: Path, n: int, seed: int) -> Path:
    """Sentiment rows whose label is carried by a cue word: a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    lines = ["label,text"]
    for i in range(n):
        label = LABELS[i % 3]
        words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(_CUE[label]))
        lines.append(f"{label},{' '.join(words)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _checksum(path: Path) -> str:
    from bigml.compression.storage import tree_checksum

    return tree_checksum(path)


@pytest.fixture(scope="module")
def labeled_csv(tmp_path_factory) -> Path:
    return _tweets(tmp_path_factory.mktemp("labeled") / "tweets.csv", 300, 0)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, labeled_csv) -> Path:
    """A 4-layer BERT classifier (hidden 32), untrained: the tests check mechanics, not accuracy."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("classifier")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for ws in _CUE.values() for w in ws} | set(_FILLER))]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), model_max_length=64)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory, corpus, cache_dir) -> Path:
    """A tiny GPT-2 from `bigml pretrain` (2 layers, so distill.student=half has a layer to drop)."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        code = main(["pretrain", *TINY_GPT, *TINY_RUN, "model.num_layers=2", f"data.path={corpus}",
                     f"hydra.run.dir={root / 'run'}"])
    assert code == 0
    return root / "run" / "model"


def compress(cli, run_dir: Path, model: Path, *args):
    return cli("compress", f"model.path={model}", f"hydra.run.dir={run_dir}", *MEASURE, *args)


def _cls(labeled_csv):
    return ["data=labeled", f"data.path={labeled_csv}", "data.test_fraction=0.3", "data.max_length=64", "eval.batch_size=64"]


def _lm(corpus):
    return ["data=text", f"data.path={corpus}", "data.block_size=32", "eval.max_batches=4", "eval.batch_size=8"]


# -- quantize --------------------------------------------------------------------------------------

def test_quantize_int8_report_reload_and_input_untouched(cli, tmp_path, classifier, labeled_csv):
    before = _checksum(classifier)
    run = tmp_path / "q"
    r = compress(cli, run, classifier, "method=quantize", "quantize.backend=torch.ao", *_cls(labeled_csv))
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["status"] == "completed" and m["methods"] == ["quantize"] and m["metric"] == "accuracy"
    for row in (m["before"], m["after"]):
        for key in ("params", "size_mb", "latency_ms", "throughput", "accuracy", "f1_macro", "linear_mb"):
            assert key in row, key
    assert m["after"]["params"] == m["before"]["params"]
    assert m["after"]["linear_mb"] * 3 < m["before"]["linear_mb"]  # int8 + one scale per row vs fp32
    assert m["after"]["size_mb"] < m["before"]["size_mb"]
    assert abs(m["after"]["accuracy"] - m["before"]["accuracy"]) <= 0.1
    assert "bigml compress" in r.err and "latency" in r.err
    assert _checksum(classifier) == before
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["bigml_quantization"]["scheme"] == "int8-dynamic"

    # bigml eval reloads it (no recalibration) and gets the accuracy compress reported
    ev = tmp_path / "eval"
    r = cli("eval", f"model.path={run / 'model'}", f"hydra.run.dir={ev}", *_cls(labeled_csv), "eval.split=test")
    assert r.code == 0, r.err
    assert r.metrics(ev)["accuracy"] == pytest.approx(m["after"]["accuracy"], abs=1e-6)

    # quantizing it again is refused
    r = compress(cli, tmp_path / "again", run / "model", "method=quantize", *_cls(labeled_csv))
    assert r.code == 2 and "already quantized" in r.err


@pytest.mark.parametrize("dtype", ["int4", "bf16"])
def test_quantize_int4_and_bf16_on_a_causal_lm(cli, tmp_path, causal_lm, corpus, dtype):
    run = tmp_path / dtype
    r = compress(cli, run, causal_lm, "method=quantize", f"quantize.dtype={dtype}", *_lm(corpus))
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["metric"] == "perplexity" and m["after"]["perplexity"] > 0
    assert m["after"]["size_mb"] < m["before"]["size_mb"]
    assert m["after"]["perplexity"] < m["before"]["perplexity"] * 1.5
    import torch

    from bigml.models.loading import load_model  # the loader every command uses

    lm, _ = load_model(str(run / "model"), "causal_lm")
    out = lm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    r = cli("generate", f"model.path={run / 'model'}", "prompt=the cat", "max_new_tokens=4")
    assert r.code == 0, r.err  # bigml generate loads the compressed model
    assert "tokens/s" in r.err
    if dtype == "int4":  # and says so when asked to quantize it again at decoding time
        r = cli("generate", f"model.path={run / 'model'}", "prompt=the cat", "max_new_tokens=4", "quantize=int8")
        assert r.code == 2 and "already quantized" in r.err.strip().splitlines()[-1]


def test_quantize_fp16_halves_the_float_weights(cli, tmp_path, classifier, labeled_csv):
    import torch
    from safetensors import safe_open

    run = tmp_path / "fp16"
    r = compress(cli, run, classifier, "method=quantize", "quantize.dtype=fp16", *_cls(labeled_csv))
    assert r.code == 0, r.err
    m = r.metrics(run)
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        floats = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert floats == {torch.float16}
    assert m["after"]["size_mb"] == pytest.approx(m["before"]["size_mb"] / 2, rel=0.15)
    assert abs(m["after"]["accuracy"] - m["before"]["accuracy"]) <= 0.02


def _linear_sparsity(model_dir: Path) -> dict[str, float]:
    """Share of zeros in each encoder Linear weight, read from the saved file (not from bigml)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            w = f.get_tensor(k)
            if k.startswith("bert.encoder.") and k.endswith(".weight") and w.ndim == 2:
                out[k] = float((w == 0).float().mean())
    return out


@pytest.fixture(scope="module")
def uneven_classifier(tmp_path_factory, classifier) -> Path:
    """The classifier with one FFN matrix 4x larger than the rest: a global threshold spares it."""
    import shutil

    import torch
    from transformers import BertForSequenceClassification

    out = tmp_path_factory.mktemp("uneven") / "model"
    shutil.copytree(classifier, out)
    model = BertForSequenceClassification.from_pretrained(str(out))
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(4.0)
    model.save_pretrained(str(out))
    return out


def test_prune_scope_layer_gives_every_linear_the_same_share(cli, tmp_path, uneven_classifier, labeled_csv):
    shares = {}
    for scope in ("layer", "global"):
        r = compress(cli, tmp_path / scope, uneven_classifier, "method=prune", "prune.sparsity=0.5",
                     f"prune.scope={scope}", *_cls(labeled_csv))
        assert r.code == 0, r.err
        shares[scope] = _linear_sparsity(tmp_path / scope / "model")
    big = "bert.encoder.layer.0.intermediate.dense.weight"
    assert all(abs(v - 0.5) < 0.01 for v in shares["layer"].values()), shares["layer"]
    assert shares["global"][big] < 0.2  # the large matrix keeps most of its weights under one threshold
    assert max(shares["global"].values()) > 0.5


# -- prune -----------------------------------------------------------------------------------------

def test_unstructured_prune_with_recovery_says_dense_kernels_gain_nothing(cli, tmp_path, classifier, labeled_csv):
    run = tmp_path / "p"
    r = compress(cli, run, classifier, "method=prune", "prune.sparsity=0.5", "prune.recover_steps=3",
                 *_cls(labeled_csv), *TRAIN)
    assert r.code == 0, r.err
    m = r.metrics(run)
    stage = m["stages"][0]
    assert stage["recovery"]["steps"] == 3
    assert m["after"]["sparsity"] >= 0.45
    assert m["after"]["params"] == m["before"]["params"]
    assert "dense" in stage["note"] and "dense" in r.err


@pytest.mark.parametrize("kind,check", [("ffn", "ffn_neurons_kept"), ("layers", "layers_kept")])
def test_structured_prune_really_shrinks(cli, tmp_path, classifier, labeled_csv, kind, check):
    run = tmp_path / kind
    r = compress(cli, run, classifier, "method=prune", f"prune.structured={kind}", "prune.sparsity=0.5",
                 *_cls(labeled_csv))
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["after"]["params"] < m["before"]["params"]
    assert m["after"]["size_mb"] < m["before"]["size_mb"]
    assert check in m["stages"][0]
    from transformers import AutoModelForSequenceClassification  # plain transformers loads it

    model = AutoModelForSequenceClassification.from_pretrained(str(run / "model"))
    assert sum(p.numel() for p in model.parameters()) == m["after"]["params"]


@pytest.fixture(scope="module")
def wide_vocab_classifier(tmp_path_factory) -> Path:
    """A classifier whose WordPiece vocabulary holds 300 words the data never uses."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("wide-vocab")
    words = sorted({w for ws in _CUE.values() for w in ws} | set(_FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"unused{i}" for i in range(300)], *words]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), model_max_length=64)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_prune_vocab_keeps_only_used_tokens_and_the_same_predictions(cli, tmp_path, wide_vocab_classifier, labeled_csv):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "vocab"
    r = compress(cli, run, wide_vocab_classifier, "method=prune", "prune.structured=vocab", *_cls(labeled_csv))
    assert r.code == 0, r.err
    m = r.metrics(run)
    s = m["stages"][0]
    n_words = len({w for ws in _CUE.values() for w in ws} | set(_FILLER))
    assert s["vocab_before"] == 5 + 300 + n_words and s["vocab_kept"] <= 5 + n_words
    assert m["after"]["params"] == m["before"]["params"] - 32 * (s["vocab_before"] - s["vocab_kept"])
    # plain transformers loads the trimmed pair; every text of the data gets the very same logits
    new_tok, old_tok = AutoTokenizer.from_pretrained(str(run / "model")), AutoTokenizer.from_pretrained(str(wide_vocab_classifier))
    new = AutoModelForSequenceClassification.from_pretrained(str(run / "model")).eval()
    old = AutoModelForSequenceClassification.from_pretrained(str(wide_vocab_classifier)).eval()
    assert len(new_tok) == s["vocab_kept"] == new.config.vocab_size
    texts = [line.split(",", 1)[1] for line in labeled_csv.read_text().splitlines()[1:40]]
    with torch.no_grad():
        a = new(**new_tok(texts, padding=True, return_tensors="pt")).logits
        b = old(**old_tok(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert m["after"]["accuracy"] == m["before"]["accuracy"]
    assert new_tok.decode(new_tok("the sad table")["input_ids"], skip_special_tokens=True) == "the sad table"


def test_prune_vocab_refuses_a_byte_level_language_model(cli, tmp_path, causal_lm, corpus):
    r = compress(cli, tmp_path / "v", causal_lm, "method=prune", "prune.structured=vocab", *_lm(corpus))
    assert r.code == 2 and "WordPiece" in r.err.strip().splitlines()[-1]


# -- distill ---------------------------------------------------------------------------------------

def test_distill_classifier_to_half(cli, tmp_path, classifier, labeled_csv):
    run = tmp_path / "d"
    r = compress(cli, run, classifier, "method=distill", "distill.student=half", "distill.steps=4",
                 "distill.hidden_weight=0.1", *_cls(labeled_csv), *TRAIN)
    assert r.code == 0, r.err
    m = r.metrics(run)
    s = m["stages"][0]
    assert s["student_params"] < s["teacher_params"] and s["steps"] == 4
    assert json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.fixture(scope="module")
def wide_classifier(tmp_path_factory, classifier) -> Path:
    """The classifier's vocabulary and labels at 256 wide: larger than the bert-tiny preset."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("wide")
    config = BertConfig.from_pretrained(str(classifier))
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 256, 1024, 4
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out))
    BertTokenizerFast.from_pretrained(str(classifier)).save_pretrained(str(out))
    return out


def test_distill_classifier_to_a_named_preset(cli, tmp_path, wide_classifier, labeled_csv):
    run = tmp_path / "preset"
    r = compress(cli, run, wide_classifier, "method=distill", "distill.student=bert-tiny", "distill.steps=3",
                 *_cls(labeled_csv), *TRAIN)
    assert r.code == 0, r.err
    s = r.metrics(run)["stages"][0]
    config = json.loads((run / "model" / "config.json").read_text())
    teacher = json.loads((wide_classifier / "config.json").read_text())
    # the preset's shape (conf/model/bert-tiny.yaml), the teacher's vocabulary and labels
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 128, 2)
    assert config["vocab_size"] == teacher["vocab_size"] and config["id2label"] == teacher["id2label"]
    assert s["student_params"] < s["teacher_params"] and s["steps"] == 3


def test_distill_causal_lm_on_a_corpus(cli, tmp_path, causal_lm, corpus):
    run = tmp_path / "dlm"
    r = compress(cli, run, causal_lm, "method=distill", "distill.steps=3", *_lm(corpus), *TRAIN)
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["after"]["params"] < m["before"]["params"] and m["after"]["perplexity"] > 0


# -- the chain -------------------------------------------------------------------------------------

def test_chain_distill_prune_quantize_one_report(cli, tmp_path, classifier, labeled_csv):
    before = _checksum(classifier)
    run = tmp_path / "chain"
    r = compress(cli, run, classifier, "method=[distill,prune,quantize]", "distill.steps=3", "prune.sparsity=0.3",
                 "prune.recover_steps=2", "quantize.backend=torch.ao", *_cls(labeled_csv), *TRAIN)
    assert r.code == 0, r.err
    m = r.metrics(run)
    assert m["methods"] == ["distill", "prune", "quantize"]
    assert [s["method"] for s in m["stages"]] == m["methods"]
    for a, b in zip(m["stages"], m["stages"][1:], strict=False):
        assert b["before"] == a["after"]
    assert m["before"] == m["stages"][0]["before"] and m["after"] == m["stages"][-1]["after"]
    assert (run / "stages" / "1-distill" / "config.json").exists()
    assert "1. distill" in r.err and "3. quantize" in r.err
    assert _checksum(classifier) == before


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["method=shrink"], "method=shrink"),
    (["method=prune", "prune.sparsity=1.0"], "prune.sparsity"),
    (["method=prune", "prune.sparsity=-0.1"], "prune.sparsity"),
    (["method=distill", "distill.student=bert-base"], "not fewer than the teacher"),
    (["method=[quantize,prune]"], "last stage"),
    (["method=quantize", "quantize.dtype=int3"], "quantize.dtype"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, classifier, labeled_csv, args, needle):
    r = compress(cli, tmp_path / "bad", classifier, *args, *_cls(labeled_csv))
    assert r.code == 2, r.err
    line = [x for x in r.err.splitlines() if "error:" in x]
    assert len(line) == 1 and needle in line[0], r.err
    assert "Traceback" not in r.err


def test_model_dir_without_weights(cli, tmp_path, classifier, labeled_csv):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((classifier / "config.json").read_text())
    r = compress(cli, tmp_path / "bad", empty, "method=quantize", *_cls(labeled_csv))
    assert r.code == 2 and "no weights" in r.err and "Traceback" not in r.err
