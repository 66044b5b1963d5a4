"""The README's main job on the real default corpus (the Python standard library), shortened."""

from __future__ import annotations

import json
from pathlib import Path


def test_default_corpus_pretraining_from_the_console_script(run_script, env, tmp_path):
    r = run_script("pretrain", "model=bert-tiny", "trainer.max_steps=40", "trainer.val_check_interval=20",
                   "trainer.limit_val_batches=5", cwd=tmp_path)
    assert r.code == 0, r.err
    (metrics,) = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain/*/metrics.json"))
    m = json.loads(metrics.read_text())
    assert m["status"] == "completed" and m["objective"] == "masked"
    assert m["val_loss"] < m["val_loss_initial"] - 1.5, m
    assert m["tokens_seen"] == 40 * 32 * 128
    assert "corpus: 7" in r.err  # ~730 stdlib modules
