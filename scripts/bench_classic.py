"""The classic systems on real data that installs offline: image classifiers (MLP, CNN) on digits and
Fashion-MNIST, linear regression against scikit-learn, a character LSTM on Shakespeare, a DCGAN's
FID over training, k-fold cross-validation and an ensemble.

    python scripts/bench_classic.py --out section.md      # via `make bench BENCH=classic`

Every figure comes from a `bigml` console-script run (its metrics.json); scikit-learn's closed-form
LinearRegression is fitted in this process on the very rows bigml trained on. Sizes shrink on a busy
machine: BENCH_CLASSIC_FASHION_ROWS (training images of Fashion-MNIST, default 60000),
BENCH_CLASSIC_FASHION_EPOCHS (default: the presets'), BENCH_CLASSIC_LSTM_STEPS (default 2000), BENCH_CLASSIC_GAN_ROWS (default 60000),
BENCH_CLASSIC_GAN_EPOCHS (default 10); the section says which sizes ran.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, bigml_cmd, parser, table  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
GRID = REPO / "docs" / "bench" / "classic-dcgan-fashion-mnist.png"


def run(tmp: str, name: str, *args: str) -> tuple[dict, float, str]:
    quiet = ["logger=none"] if args[0] in ("finetune", "pretrain") else []  # eval has no logger
    wall, _, err = bigml_cmd(*args, f"hydra.run.dir={tmp}/{name}", *quiet,
                             env={"BIGML_CACHE_DIR": f"{tmp}/cache", "CI": "1", "HF_HUB_OFFLINE": "1"})
    return json.loads(Path(tmp, name, "metrics.json").read_text()), wall, err


def images(tmp: str, quick: bool) -> tuple[str, list[str]]:
    rows, notes = [], []
    fashion_rows = 2000 if quick else int(os.environ.get("BENCH_CLASSIC_FASHION_ROWS", 60000))
    sets = [("digits", ["data=digits"])]
    if FASHION.is_dir():
        sets.append(("fashion-mnist", ["data=fashion-mnist", f"data.max_examples={fashion_rows}"]))
    else:
        notes.append("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist): its rows are missing.")
    fashion_epochs = os.environ.get("BENCH_CLASSIC_FASHION_EPOCHS")
    for data_name, data_args in sets:
        for model in ("mlp", "cnn"):
            extra = ["trainer.max_epochs=2"] if quick else \
                [f"trainer.max_epochs={fashion_epochs}"] if fashion_epochs and data_name == "fashion-mnist" else []
            m, wall, _ = run(tmp, f"{model}-{data_name}", "finetune", f"model={model}", *data_args, *extra)
            epochs = max(int(m["epochs"]), 1)
            rows.append([data_name, model, f"{m['params']:,}", m["train_examples"], m["test_examples"], epochs,
                         f"{m['train_time_s'] / epochs:.1f}", f"{m['test_accuracy']:.4f}", f"{m['test_f1_macro']:.4f}",
                         f"{wall:.0f}"])
    text = table(["data", "model", "parameters", "train images", "test images", "epochs run", "s / epoch",
                  "test accuracy", "test F1 macro", "wall s"], rows)
    cmd = "bigml finetune model=mlp|cnn data=digits|fashion-mnist" + \
        (f" data.max_examples={fashion_rows}" if fashion_rows < 60000 else "") + \
        (f" (Fashion-MNIST: trainer.max_epochs={fashion_epochs})" if fashion_epochs and not quick else "")
    return (f"`{cmd}` (each preset's own training defaults otherwise; early stopping on val F1; s / epoch is the "
            f"fit time, validation included, over the epochs run):\n\n{text}\n\n" + " ".join(notes)), []


def linear(tmp: str) -> str:
    import numpy as np
    from omegaconf import OmegaConf
    from sklearn.linear_model import LinearRegression

    from bigml.data.tabular import read_table
    from bigml.tasks import get_task

    rows = []
    for data in ("diabetes",):
        m, wall, _ = run(tmp, f"linear-{data}", "finetune", "model=linear", "task=regression", f"data={data}")
        cfg = OmegaConf.create({"name": data, "kind": "labeled", "path": None, "label_column": "target",
                                "val_fraction": 0.1, "test_fraction": 0.1, "feature_columns": None})
        raw = read_table(cfg, get_task("tabular-regression"), 1337, f"{tmp}/cache")
        x, y = np.array(raw.train["features"], dtype=np.float64), np.array(raw.train["label"])
        xt, yt = np.array(raw.test["features"], dtype=np.float64), np.array(raw.test["label"])
        pred = LinearRegression().fit(x, y).predict(xt)
        sk_mse = float(np.mean((pred - yt) ** 2))
        sk_r2 = 1 - sk_mse / float(np.var(yt))
        rows.append([data, len(x), len(xt), f"{m['test_mse']:.1f}", f"{sk_mse:.1f}",
                     f"{100 * (m['test_mse'] / sk_mse - 1):+.2f}%", f"{m['test_r2']:.4f}", f"{sk_r2:.4f}", m["epochs"],
                     f"{wall:.0f}"])
    return ("`bigml finetune model=linear task=regression data=diabetes` (Adam on standardized features and "
            "target, early stopping on val MSE) against scikit-learn's closed-form `LinearRegression` fitted on the "
            "same training rows (bigml's seeded carve), scored on the same test rows:\n\n" +
            table(["data", "train rows", "test rows", "bigml test MSE", "scikit-learn test MSE", "bigml vs sklearn",
                   "bigml R²", "sklearn R²", "epochs", "wall s"], rows))


def lstm(tmp: str, quick: bool) -> str:
    steps = 30 if quick else int(os.environ.get("BENCH_CLASSIC_LSTM_STEPS", 2000))
    m, wall, _ = run(tmp, "lstm", "pretrain", "model=lstm", "tokenizer=char", "data=shakespeare",
                     f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(steps // 4, 1)}")
    model = f"{tmp}/lstm/model"
    samples = []
    for args in (["do_sample=false"], ["do_sample=true", "temperature=0.8", "seed=1"]):
        _, out, _ = bigml_cmd("generate", f"model.path={model}", "prompt=ROMEO:", "max_new_tokens=160", *args,
                              env={"CI": "1", "HF_HUB_OFFLINE": "1"})
        samples.append((" ".join(args), out.rstrip("\n")))
    rows = [["lstm 2 x 256 (char)", f"{m['params']:,}", m["step"], f"{m['tokens_seen']:,}",
             f"{m['val_loss_initial']:.3f}", f"{m['val_loss']:.3f}", f"{m['val_perplexity']:.2f}",
             f"{m['tokens_per_sec']:,.0f}", f"{wall:.0f}"]]
    text = table(["model", "parameters", "steps", "tokens seen", "val loss at start", "val loss", "val perplexity",
                  "tokens/s", "wall s"], rows)
    shown = "\n\n".join(f"`bigml generate model.path=<run>/model prompt=\"ROMEO:\" max_new_tokens=160 {a}`:\n\n"
                        f"```\nROMEO:{s}\n```" for a, s in samples)
    return (f"`bigml pretrain model=lstm tokenizer=char data=shakespeare trainer.max_steps={steps}` (32 blocks of "
            f"128 characters per step; perplexity per character on the held-out 5% of the plays):\n\n{text}\n\n{shown}")


def gan(tmp: str, quick: bool) -> str:
    if not FASHION.is_dir():
        return "Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist): no GAN figures."
    n = 2000 if quick else int(os.environ.get("BENCH_CLASSIC_GAN_ROWS", 60000))
    epochs = 2 if quick else int(os.environ.get("BENCH_CLASSIC_GAN_EPOCHS", 10))
    m, wall, _ = run(tmp, "dcgan", "pretrain", "model=dcgan", "data=fashion-mnist", f"data.max_examples={n}",
                     f"trainer.max_epochs={epochs}")
    GRID.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(m["grid"], GRID)
    rows = [[h["epoch"] + 1, h["step"], f"{h['fid']:.2f}"] for h in m["fid_history"]]
    rel = GRID.relative_to(REPO)
    return (f"`bigml pretrain model=dcgan data=fashion-mnist data.max_examples={n} trainer.max_epochs={epochs}`: "
            f"generator {m['params']:,} and discriminator {m['discriminator_params']:,} parameters, "
            f"{m['train_time_s']:.0f} s of training ({wall:.0f} s wall). FID of {m['fid_samples']} generated images "
            f"against {m['fid_real_images']} held-out real ones, **in the feature space of a CNN bigml trained on the "
            f"same images first** (val accuracy {m['fid_classifier_val_accuracy']:.3f}; not Inception-v3, whose "
            f"weights are a download: these FIDs compare runs scored with this classifier only):\n\n"
            + table(["epoch", "step", "FID"], rows) +
            f"\n\nThe best epoch's generator (the exported model), 64 images from fixed noise: ![DCGAN samples]({rel})")


def kfold(tmp: str) -> str:
    m, wall, _ = run(tmp, "cv", "finetune", "model=mlp", "data=breast-cancer", "cv.folds=5")
    rows = [[f"fold {f['fold']}", f"{f['val_accuracy']:.4f}", f"{f['val_f1_macro']:.4f}", f"{f['test_accuracy']:.4f}"]
            for f in m["folds"]]
    rows.append(["mean ± std", f"{m['val_accuracy']:.4f} ± {m['val_accuracy_std']:.4f}",
                 f"{m['val_f1_macro']:.4f} ± {m['val_f1_macro_std']:.4f}",
                 f"{m['test_accuracy']:.4f} ± {m['test_accuracy_std']:.4f}"])
    return (f"`bigml finetune model=mlp data=breast-cancer cv.folds=5` ({m['train_examples']} training rows in 5 "
            f"stratified seeded folds, each fold's model early-stopped on its held-out fold; the 57 test rows "
            f"scored by every fold; {wall:.0f} s wall):\n\n"
            + table(["fold", "val accuracy (held-out fold)", "val F1 macro", "test accuracy"], rows))


def ensemble(tmp: str, quick: bool) -> str:
    # members differ by architecture, not by seed: the seed also carves the splits, and every member must
    # hold out the same test rows that `bigml eval data=digits` scores (seed 1337's carve)
    members = [("mlp 256-128", ["model=mlp"]), ("mlp 512, dropout 0.3", ["model=mlp", "model.hidden_sizes=[512]",
                                                                          "model.dropout=0.3"]),
               ("cnn 32-64", ["model=cnn"])]
    extra = ["trainer.max_epochs=2"] if quick else []
    dirs = []
    for i, (_, args) in enumerate(members):
        run(tmp, f"ens-{i}", "finetune", "data=digits", *args, *extra)
        dirs.append(f"{tmp}/ens-{i}/model")
    m, wall, _ = run(tmp, "ens", "eval", f"model.path=[{','.join(dirs)}]", "data=digits")
    rows = [[name, f"{x['accuracy']:.4f}", f"{x['loss']:.4f}"] for (name, _), x in zip(members, m["members"], strict=True)]
    rows.append(["ensemble (mean of the probabilities)", f"{m['accuracy']:.4f}", f"{m['loss']:.4f}"])
    return ("Three digit classifiers (`bigml finetune data=digits model=mlp | mlp model.hidden_sizes=[512] "
            "model.dropout=0.3 | cnn`, the same seeded splits), then "
            "`bigml eval model.path=[a,b,c] data=digits` on the 359 test digits none of them trained on:\n\n"
            + table(["model", "test accuracy", "test loss"], rows) +
            f"\n\nGain over the best member: {m['ensemble_gain_accuracy']:+.4f} accuracy "
            f"({m['best_member_accuracy']:.4f} -> {m['accuracy']:.4f}).")


def main() -> None:
    a = parser(__doc__).parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        img, _ = images(tmp, a.quick)
        parts.append(("Image classification", img))
        parts.append(("Linear regression against scikit-learn", linear(tmp)))
        parts.append(("Character LSTM on Shakespeare", lstm(tmp, a.quick)))
        parts.append(("DCGAN on Fashion-MNIST: FID over training", gan(tmp, a.quick)))
        parts.append(("k-fold cross-validation", kfold(tmp)))
        parts.append(("Ensemble", ensemble(tmp, a.quick)))
    body = "\n\n".join(f"### {title}\n\n{text}" for title, text in parts)
    env = os.environ.get
    sizes = ("--quick: smoke-test sizes, the figures mean nothing" if a.quick else
             f"Fashion-MNIST training images {env('BENCH_CLASSIC_FASHION_ROWS', '60000')} (test images: a fifth of that "
             f"when fewer than 60000), epochs {env('BENCH_CLASSIC_FASHION_EPOCHS', 'as the presets say')}; LSTM steps "
             f"{env('BENCH_CLASSIC_LSTM_STEPS', '2000')}; GAN images {env('BENCH_CLASSIC_GAN_ROWS', '60000')} x "
             f"{env('BENCH_CLASSIC_GAN_EPOCHS', '10')} epochs")
    a.out.write_text(f"""## Classic systems: images, tables, LSTM, GAN, k-fold, ensembles

`scripts/bench_classic.py` runs the `bigml` console script on data that installs offline (scikit-learn's bundled
sets, Debian's Fashion-MNIST, the `shakespeare` package), with each model preset's own training defaults. Sizes:
{sizes}. Load average {load:.1f} on {os.cpu_count()} shared cores at the start: times are slow and noisy; the
accuracies and the ratios are the figures to read.

{body}
""")


if __name__ == "__main__":
    main()
