"""Faults a real training run meets, one unit-sized test each (scripts/faults.py injects them many
times at random points and writes RELIABILITY.md): preemption signals, NaN losses, kills in the
middle of a write, damaged checkpoints / caches / model directories, a full or read-only disk,
malformed rows, concurrent cache builds, a dead DDP rank, and inputs from someone else."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIGML_SCRIPT, TINY_FT, TINY_GPT, TINY_RUN

ARGS = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=36", "checkpoint.every_n_steps=6", "trainer.val_check_interval=12",
        "trainer.precision=32-true"]
SHORT = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=12", "trainer.precision=32-true"]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> dict:
    """An uninterrupted run of ARGS: what every interrupted-and-resumed run must end equal to."""
    out = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "BIGML_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "faults-cache"), "CI": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([BIGML_SCRIPT, "pretrain", *ARGS, f"data.path={corpus}", f"hydra.run.dir={out / 'run'}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return _metrics(out / "run")


def _assert_equal_to_reference(m: dict, ref: dict) -> None:
    assert m["status"] == "completed" and m["step"] == ref["step"]
    assert m["tokens_seen"] == ref["tokens_seen"]
    assert m["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-5)
    assert m["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)


def _start(env, corpus, run: Path, *extra: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([BIGML_SCRIPT, "pretrain", *ARGS, f"data.path={corpus}", f"hydra.run.dir={run}", *extra],
                            env={**env, "BIGML_CACHE_DIR": env["BIGML_CACHE_DIR"], **(extra_env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list(root.glob(path_glob)):
        assert proc.poll() is None, f"the run ended first: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)


# -- preemption -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_a_checkpoint_exits_143_and_resume_ends_equal(sig, run_script, env, corpus, tmp_path,
                                                                                   reference):
    run = tmp_path / "run"
    proc = _start(env, corpus, run)
    _wait_for("checkpoints/step-000012.ckpt", run, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"preempted by {sig.name}" in _last_line(err) and "resume=auto" in _last_line(err)
    m = _metrics(run)
    assert m["status"] == "preempted"
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step >= 12  # saved at the step boundary after the signal, not the last periodic checkpoint only

    resumed = run_script("pretrain", *ARGS, f"data.path={corpus}", f"resume={run}")
    assert resumed.code == 0, resumed.err
    _assert_equal_to_reference(_metrics(run), reference)


# -- NaN / inf loss ---------------------------------------------------------------------------------

def test_nonfinite_stop_is_the_default_diverged_exit_1(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_FAULT_NAN_STEPS", "5")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.code == 1 and "training diverged at step 5" in _last_line(r.err)
    assert _metrics(tmp_path / "run")["status"] == "diverged"
    assert not (tmp_path / "run" / "model").exists()


def test_nonfinite_skip_drops_the_batches_and_counts_them(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_FAULT_NAN_STEPS", "3,7")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.on_nonfinite=skip")
    assert r.code == 0, r.err
    m = _metrics(tmp_path / "run")
    assert m["status"] == "completed" and m["nonfinite_skipped"] == 2 and m["step"] == 12
    assert m["tokens_seen"] == 10 * 8 * 32  # the two skipped batches trained nothing (their steps were no-ops)


def test_nonfinite_rollback_returns_to_the_last_checkpoint_with_a_lower_lr(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_FAULT_NAN_STEPS", "8")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.on_nonfinite=rollback",
            "checkpoint.every_n_steps=6")
    assert r.code == 0, r.err
    assert "rolling back to last.ckpt with the learning rate x0.5" in r.err
    m = _metrics(tmp_path / "run")
    assert m["status"] == "completed" and m["rollbacks"] == 1 and m["lr_scale"] == 0.5 and m["step"] == 12
    assert not (tmp_path / "run" / "checkpoints" / "step-000000.ckpt").exists()


def test_nonfinite_rollback_is_bounded(cli, corpus, tmp_path):
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}", "trainer.on_nonfinite=rollback",
            "trainer.max_rollbacks=2", "optimizer.lr=1e30", "scheduler.warmup_steps=0", "trainer.gradient_clip_val=0")
    assert r.code == 1 and "after 2 rollbacks" in _last_line(r.err)
    assert r.err.count("rolling back to step-000000.ckpt") == 2
    assert _metrics(tmp_path / "run")["status"] == "diverged"


def test_nonfinite_skip_in_finetuning(cli, labeled_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_FAULT_NAN_STEPS", "2")
    r = cli("finetune", *TINY_FT, f"data.path={labeled_csv}", f"hydra.run.dir={tmp_path / 'run'}",
            "trainer.on_nonfinite=skip", "trainer.max_epochs=1")
    assert r.code == 0, r.err
    assert _metrics(tmp_path / "run")["nonfinite_skipped"] == 1


# -- kills in the middle of a write -----------------------------------------------------------------

@pytest.mark.parametrize("target", ["last.ckpt:2", "model"])
def test_a_kill_mid_write_leaves_the_previous_state_and_resume_ends_equal(target, run_script, env, corpus, tmp_path,
                                                                           reference):
    run = tmp_path / "run"
    killed = run_script("pretrain", *ARGS, f"data.path={corpus}", f"hydra.run.dir={run}",
                        extra_env={"BIGML_FAULT": f"kill:{target}"})
    assert killed.code == -signal.SIGKILL
    assert not (run / "metrics.json").exists() and not (run / "model").exists()
    assert list(run.rglob(".*.tmp"))  # the half-written temporary is there, under a name nobody reads
    resumed = run_script("pretrain", *ARGS, f"data.path={corpus}", f"resume={run}")
    assert resumed.code == 0, resumed.err
    assert not list(run.rglob(".*.tmp"))  # cleaned up on resume
    _assert_equal_to_reference(_metrics(run), reference)


# -- damaged files ------------------------------------------------------------------------------------

def _flip_bytes(path: Path, offset_share: float = 0.5, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_share)
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={run}", "checkpoint.every_n_steps=4",
               "checkpoint.keep=3").code == 0
    ckpts = run / "checkpoints"
    _flip_bytes(ckpts / "last.ckpt")       # random bytes inside the tensor data: only the checksum sees it
    _truncate(ckpts / "step-000012.ckpt")  # cut short
    (run / "metrics.json").unlink()        # pretend the run was interrupted
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"resume={run}", "trainer.max_steps=16", "checkpoint.every_n_steps=4",
            "checkpoint.keep=3")
    assert r.code == 0, r.err
    assert "skipping checkpoint" in r.err and "last.ckpt (does not match its checksum" in r.err
    assert f"resuming from {ckpts / 'step-000008.ckpt'}" in r.err
    assert _metrics(run)["step"] == 16


def test_a_checkpoint_holding_code_is_refused_and_never_run(tmp_path):
    from bigml.atomic import CorruptFile
    from bigml.training.checkpoints import load_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "evil.ckpt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CorruptFile, match="holds Python objects besides tensors"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_old_checkpoints_with_numpy_rng_state_still_load(tmp_path):
    import numpy as np

    from bigml.training.checkpoints import load_checkpoint

    torch.save({"bigml": {"rng": {"numpy": np.random.get_state()}}}, tmp_path / "old.ckpt")
    state = load_checkpoint(tmp_path / "old.ckpt")["bigml"]["rng"]["numpy"]
    assert state[0] == "MT19937" and len(state[1]) == 624


def test_a_damaged_corpus_cache_or_tokenizer_cache_is_rebuilt(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_CACHE_DIR", str(tmp_path / "cache"))
    assert cli("pretrain", *SHORT, f"data.path={corpus}", "trainer.max_steps=2", "dry_run=true",
               f"hydra.run.dir={tmp_path / 'a'}").code == 0
    (tokens,) = (tmp_path / "cache" / "corpora").glob("*/tokens.bin")
    (tok,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    _flip_bytes(tokens)
    _truncate(tok)
    r = cli("pretrain", *SHORT, f"data.path={corpus}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0, r.err
    assert "the cached tokenizer" in r.err and "tokenizer.json: does not match SHA256SUMS" in r.err
    assert "the cached tokenized corpus" in r.err and "rebuilding it" in r.err
    (tokens,) = (tmp_path / "cache" / "corpora").glob("*/tokens.bin")
    from bigml.atomic import verify_directory

    assert verify_directory(tokens.parent)


def test_a_cache_entry_without_checksums_that_is_truncated_is_rebuilt(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_CACHE_DIR", str(tmp_path / "cache"))
    assert cli("pretrain", *SHORT, f"data.path={corpus}", "dry_run=true", f"hydra.run.dir={tmp_path / 'a'}").code == 0
    (entry,) = [d for d in (tmp_path / "cache" / "corpora").iterdir() if d.is_dir()]
    (entry / "SHA256SUMS").unlink()  # as written by an older bigml
    _truncate(entry / "tokens.bin")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", "dry_run=true", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0 and "tokens.bin holds" in r.err and "rebuilding it" in r.err


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_model_directory_stops_with_one_line_naming_the_file(damage, cli, corpus, tmp_path):
    assert cli("pretrain", *SHORT, f"data.path={corpus}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}").code == 0
    model = tmp_path / "a" / "model"
    (_flip_bytes if damage == "flip" else _truncate)(model / "model.safetensors")
    r = cli("generate", f"model.path={model}", "prompt=the cat", "max_new_tokens=3")
    assert r.code == 2
    assert "model.safetensors: does not match SHA256SUMS" in _last_line(r.err)
    assert "Traceback" not in r.err
    # a damaged tokenizer file in a model directory, given as tokenizer.path
    assert cli("pretrain", *SHORT, f"data.path={corpus}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'b'}").code == 0
    _truncate(tmp_path / "b" / "model" / "tokenizer.json")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"tokenizer.path={tmp_path / 'b' / 'model'}", "dry_run=true")
    assert r.code == 2 and "tokenizer.json: does not match SHA256SUMS" in _last_line(r.err)


# -- a full or read-only disk -------------------------------------------------------------------------

@pytest.mark.parametrize("fault, target, words", [("enospc", "step-000012.ckpt", "no space left on the device"),
                                                  ("erofs", "model", "the filesystem is read-only")])
def test_a_failed_write_is_one_line_exit_1_and_the_previous_checkpoint_stays(fault, target, words, cli, corpus,
                                                                              tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("BIGML_FAULT", f"{fault}:{target}")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"hydra.run.dir={run}", "checkpoint.every_n_steps=6")
    assert r.code == 1
    assert words in _last_line(r.err) and "resume=auto" in _last_line(r.err) and "Traceback" not in r.err
    assert _metrics(run)["status"] == "failed" and not (run / "model").exists()
    from bigml.training.checkpoints import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "step-000006.ckpt")["global_step"] == 6
    assert not list(run.rglob(".*.tmp"))
    monkeypatch.delenv("BIGML_FAULT")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", f"resume={run}", "checkpoint.every_n_steps=6")
    assert r.code == 0 and _metrics(run)["status"] == "completed"


# -- malformed rows -----------------------------------------------------------------------------------

def _jsonl_with_bad_rows(path: Path, n: int = 4000) -> Path:
    words = "the a cat dog sees finds river stone quickly red".split()
    with open(path, "wb") as f:
        for i in range(n):
            if i == 1041:
                f.write(b'{"text": "unterminated\n')
            elif i == 2000:
                f.write(b'["a list", "not an object"]\n')
            elif i == 3000:
                f.write(b'{"text": "bad bytes \xff\xfe"}\n')
            else:
                f.write((json.dumps({"text": " ".join(words[(i * 7 + k) % 10] for k in range(30))}) + "\n").encode())
    return path


def test_bad_jsonl_rows_error_naming_file_and_line_or_are_skipped_and_counted(cli, tmp_path):
    data = _jsonl_with_bad_rows(tmp_path / "corpus.jsonl")
    r = cli("pretrain", *SHORT, f"data.path={data}", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.code == 2
    assert _last_line(r.err).endswith(f"{data}: not valid JSON (Unterminated string starting at, column 10) at line 1042; "
                                      "fix or remove the row, or data.on_bad_rows=skip to leave such rows out")
    r = cli("pretrain", *SHORT, f"data.path={data}", f"hydra.run.dir={tmp_path / 'b'}", "data.on_bad_rows=skip")
    assert r.code == 0, r.err
    assert _metrics(tmp_path / "b")["bad_rows_skipped"] == 3
    assert "3 bad rows skipped" in r.err and "first: line 1042" in r.err


def test_bad_csv_rows_in_labeled_data(cli, labeled_csv, tmp_path):
    lines = labeled_csv.read_bytes().splitlines(keepends=True)
    lines.insert(30, b"a row with one field\n")
    lines[60] = lines[60][:3] + b"\xff" + lines[60][3:]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"".join(lines))
    r = cli("finetune", *TINY_FT, f"data.path={bad}", f"hydra.run.dir={tmp_path / 'a'}", "trainer.max_epochs=1")
    assert r.code == 2 and "1 fields where the header has 5 at line 31" in _last_line(r.err)
    r = cli("finetune", *TINY_FT, f"data.path={bad}", f"hydra.run.dir={tmp_path / 'b'}", "trainer.max_epochs=1",
            "data.on_bad_rows=skip")
    assert r.code == 0, r.err
    m = _metrics(tmp_path / "b")
    assert m["bad_rows_skipped"] == 2


def test_an_undecodable_text_document_is_one_bad_row(cli, corpus, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for f in sorted(corpus.glob("*.txt"))[:60]:
        (docs / f.name).write_bytes(f.read_bytes())
    (docs / "zz-latin.txt").write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    r = cli("pretrain", *SHORT, f"data.path={docs}", "dry_run=true", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.code == 2 and "zz-latin.txt: not valid utf-8 at line 2" in _last_line(r.err)
    r = cli("pretrain", *SHORT, f"data.path={docs}", "dry_run=true", "data.on_bad_rows=skip", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0 and "document skipped" in r.err


# -- concurrency ----------------------------------------------------------------------------------------

def test_two_runs_building_the_same_caches_at_once(env, corpus, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([BIGML_SCRIPT, "pretrain", *SHORT, f"data.path={corpus}", "dry_run=true",
                               "tokenizer.vocab_size=400", f"hydra.run.dir={tmp_path / f'run{i}'}"],
                              env={**env, "BIGML_CACHE_DIR": str(cache)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    from bigml.atomic import verify_directory

    for kind in ("tokenizers", "corpora"):
        entries = [p for p in (cache / kind).iterdir() if p.is_dir()]
        assert len(entries) == 1 and verify_directory(entries[0])
        assert not [p for p in (cache / kind).iterdir() if p.name.endswith((".tmp", ".old"))]
    m0, m1 = (_metrics(tmp_path / f"run{i}") for i in range(2))
    assert m0["tokens"] == m1["tokens"]


# -- a dead DDP rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_when_a_ddp_rank_dies_the_other_exits_nonzero_within_a_minute(victim, env, corpus, tmp_path):
    err_file = tmp_path / "err.txt"
    with open(err_file, "w") as err:
        parent = subprocess.Popen([BIGML_SCRIPT, "pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}", "trainer=ddp",
                                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=100000",
                                   "trainer.precision=32-true", f"hydra.run.dir={tmp_path / 'run'}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while "step 20/" not in err_file.read_text():
            assert time.time() < deadline and parent.poll() is None, err_file.read_text()[-3000:]
            time.sleep(0.2)
        import psutil

        (child,) = psutil.Process(parent.pid).children()
        t0 = time.time()
        if victim == "rank1":
            child.kill()
            code = parent.wait(timeout=60)
            assert code == 1
            assert "another process of this multi-process run died" in _last_line(err_file.read_text())
        else:
            parent.kill()
            parent.wait()
            child.wait(timeout=60)
        assert time.time() - t0 < 60


# -- inputs from someone else ---------------------------------------------------------------------------

def test_config_values_cannot_lead_out_of_the_output_root(cli, corpus, tmp_path):
    r = cli("pretrain", *SHORT, f"data.path={corpus}", "logger=csv", "logger.name=../../../escaped")
    assert r.code == 2 and "logger.name=../../../escaped: must be a plain name" in _last_line(r.err)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "shared.yaml").write_text(f"defaults:\n  - pretrain\n  - _self_\nhydra:\n  run:\n    dir: {tmp_path / 'elsewhere'}\n")
    r = cli("pretrain", *SHORT, f"data.path={corpus}", "--config-dir", str(conf), "--config-name", "shared")
    assert r.code == 2 and "is outside output_root" in _last_line(r.err)
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())


def test_model_code_never_runs(cli, tmp_path):
    model = tmp_path / "remote-code-model"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (model / "model.safetensors").write_bytes(b"")
    r = cli("generate", f"model.path={model}", "prompt=hi")
    assert r.code == 2 and "model.path=" in _last_line(r.err)
    assert not marker.exists()
