"""Resume: SIGKILL mid-run, then resume=auto continues from the last checkpoint, exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIGML_SCRIPT, TINY_GPT, TINY_RUN, kill_when

ARGS = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=60", "checkpoint.every_n_steps=10", "trainer.val_check_interval=30"]


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(run_script, env, corpus, tmp_path):
    reference = run_script("pretrain", *ARGS, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.code == 0, reference.err
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    root = Path(env["BIGML_OUTPUT_ROOT"])
    proc = subprocess.Popen([BIGML_SCRIPT, "pretrain", *ARGS, f"data.path={corpus}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, root, "pretrain/*/checkpoints/step-000020.ckpt")
    (run_dir,) = list(root.glob("pretrain/*"))
    assert not (run_dir / "metrics.json").exists()  # a killed run does not look finished

    resumed = run_script("pretrain", *ARGS, f"data.path={corpus}", "resume=auto")
    assert resumed.code == 0, resumed.err
    assert f"resuming from {run_dir}" in resumed.err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["step"] == 60
    assert m["tokens_seen"] == ref["tokens_seen"]
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
    assert list(root.glob("pretrain/*")) == [run_dir]  # resumed in place, no second run directory


def test_resume_auto_without_anything_to_resume_starts_fresh(cli, corpus, env):
    r = cli("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer.max_steps=4", "resume=auto")
    assert r.code == 0, r.err
    assert "starting a new run" in r.err


def test_resume_from_a_directory_without_checkpoints(cli, corpus, tmp_path):
    (tmp_path / "nothing").mkdir()
    r = cli("pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", f"resume={tmp_path / 'nothing'}")
    assert r.code == 2 and "no readable checkpoint" in r.err


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from bigml.training.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def crash(obj, f, *a, **k):  # a crash half-way through serializing the next checkpoint
        f.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temp files left behind
    from bigml.atomic import verify_file

    assert verify_file(target)  # the checksum file still vouches for the intact previous version


def test_a_truncated_checkpoint_is_skipped(tmp_path):
    from bigml.training.checkpoints import pick_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"step": 10}, ckpts / "step-000010.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"\x80\x02truncated")
    assert pick_checkpoint(tmp_path) == ckpts / "step-000010.ckpt"
