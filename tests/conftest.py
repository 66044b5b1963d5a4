"""Shared test fixtures: a generated corpus, tiny configs, and two ways to call the CLI.

`cli(...)` runs `bigml.cli.main` in this process (fast; the same code path as the console script
after argv parsing). `run_script(...)` runs the installed `bigml` console script in a subprocess,
for what only a real process shows (DDP re-launch, SIGKILL, exit codes, stdout/stderr split).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIGML_SCRIPT = shutil.which("bigml", path=str(Path(sys.executable).parent)) or shutil.which("bigml")

# A model and data small enough that a run takes seconds on 2 CPU cores.
TINY_GPT = ["model=gpt-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=64"]
TINY_BERT = ["model=bert-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
             "model.intermediate_size=64", "model.max_position_embeddings=64"]
TINY_LLAMA = ["model=llama-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=4",
              "model.num_kv_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64"]
TINY_RUN = ["tokenizer.vocab_size=300", "data.block_size=32", "data.batch_size=8", "trainer.max_steps=12",
            "trainer.val_check_interval=6", "trainer.limit_val_batches=4", "checkpoint.every_n_steps=6",
            "logger=none", "optimizer.lr=3e-3"]

_WORDS = ("the a one every some cat dog bird fish model token layer river stone tree sees finds moves "
          "keeps makes holds quickly slowly under over near far red green small large old new").split()


def make_corpus(root: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """Text files of simple, learnable sentences (a loss that can go down in a dozen steps)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = []
        for _ in range(rng.randint(5, 12)):
            words = [rng.choice(_WORDS[:9]), rng.choice(_WORDS[9:16]), rng.choice(_WORDS[16:22]),
                     rng.choice(_WORDS[:9]), rng.choice(_WORDS[26:]), rng.choice(_WORDS[9:16])]
            sentences.append(" ".join(words).capitalize() + ".")
        (root / f"doc{i:04d}.txt").write_text(" ".join(sentences) + "\n")
    return root


@dataclass
class Result:
    code: int
    out: str
    err: str

    def metrics(self, run_dir: Path) -> dict:
        return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bigml-cache")


@pytest.fixture()
def env(tmp_path, cache_dir, monkeypatch) -> dict:
    """Runs go under tmp_path/runs, caches are shared by the session, CI-style plain logs."""
    values = {"BIGML_OUTPUT_ROOT": str(tmp_path / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "CI": "1",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("BIGML_DEBUG", raising=False)
    return {**os.environ, **values}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture()
def cli(env, capfd):
    """Call the CLI in this process: cli("pretrain", "model=...") -> Result(code, out, err)."""
    from bigml.cli import main

    def call(*args: str) -> Result:
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        sys.stderr.write(err[-3000:])  # shown by pytest when the test fails
        return Result(code, out, err)

    return call


@pytest.fixture()
def run_script(env):
    """Run the installed console script: run_script("pretrain", ..., cwd=...) -> Result."""

    def call(*args: str, cwd: Path | None = None, timeout: int = 600, extra_env: dict | None = None,
             stdin: str | None = None) -> Result:
        assert BIGML_SCRIPT, "the bigml console script is not installed (pip install -e .)"
        p = subprocess.run([BIGML_SCRIPT, *map(str, args)], cwd=cwd, env={**env, **(extra_env or {})},
                           capture_output=True, text=True, timeout=timeout, input=stdin)
        return Result(p.returncode, p.stdout, p.stderr)

    return call


# -- labeled data for finetune / eval tests (appended) --------------------------------------------
TINY_FT = ["model=bert-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
           "model.intermediate_size=64", "model.max_position_embeddings=64", "tokenizer.vocab_size=300",
           "data=labeled", "data.batch_size=8", "data.max_length=32", "trainer.max_epochs=2", "logger=none",
           "optimizer.lr=3e-3", "trainer.precision=32-true"]
_POS = "good great nice lovely happy fine".split()
_NEG = "bad awful poor sad ugly terrible".split()
_FILL = "the a movie food day trip cat was is very so".split()


def make_labeled(path: Path, n: int = 200, seed: int = 0) -> Path:
    """A CSV (text, label, score, tags, words, ner) a tiny model learns in a few epochs:
    label pos/neg from sentiment words, score a number, tags a multilabel cell, ner BIO tags of words."""
    import csv

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.choice(["pos", "neg"])
        words = [rng.choice(_FILL) for _ in range(rng.randint(3, 7))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(_POS if y == "pos" else _NEG))
        tags = [y] + (["long"] if len(words) > 7 else [])
        ner = ["B-POS" if w in _POS else "B-NEG" if w in _NEG else "O" for w in words]
        rows.append({"text": " ".join(words), "label": y, "score": (1.0 if y == "pos" else -1.0) + rng.random() * 0.2,
                     "tags": ",".join(tags), "ner": " ".join(ner)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def labeled_csv(tmp_path_factory) -> Path:
    return make_labeled(tmp_path_factory.mktemp("labeled") / "data.csv")


def kill_when(proc, root: Path, pattern: str, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as a file matching `pattern` appears under `root` (a checkpoint)."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not list(root.glob(pattern)):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
