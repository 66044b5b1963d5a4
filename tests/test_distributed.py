"""Scale-out on CPU: 2-process DDP (gloo) from the console script and under torchrun."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_GPT, TINY_RUN

# fp32 so that the only difference between 1 and 2 processes is the order of float additions
ARGS = [*TINY_RUN, *TINY_GPT, "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.precision=32-true",
        "trainer.log_every_n_steps=1", "logger=csv"]


def _curve(run: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(run_script, corpus, tmp_path):
    single = run_script("pretrain", *ARGS, f"data.path={corpus}", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    assert single.code == 0, single.err
    ddp = run_script("pretrain", *ARGS, f"data.path={corpus}", "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}")
    assert ddp.code == 0, ddp.err
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["devices"] == 2 and m["replicas_identical"] is True  # all ranks ended with the same weights
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(8))
    for step in one:  # same samples per global step: equal up to float summation order
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    # one voice: rank 1 neither logs progress nor writes files
    assert ddp.err.count("run directory:") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".hydra", "bigml.log", "checkpoints", "curves.png",
                                                                      "logs", "metrics.json", "model"]


def test_torchrun_launch_writes_one_run_directory(env, corpus, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bigml", "pretrain", *ARGS,
           f"data.path={corpus}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    # the summary table is rank 0's; what a failing rank printed (gloo's "terminate called ...") is not in it
    assert p.returncode == 0, "\n".join(line for line in p.stderr.splitlines() if not line.strip().startswith("│"))[-6000:]
    runs = list(Path(env["BIGML_OUTPUT_ROOT"]).glob("pretrain/*"))
    assert len(runs) == 1 and runs[0].name.endswith("-torchrun")
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["status"] == "completed" and m["devices"] == 2 and m["replicas_identical"] is True


def test_ddp_inside_a_sweep_fails_fast(cli, corpus):
    r = cli("pretrain", "-m", *ARGS, f"data.path={corpus}", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "optimizer.lr=1e-3,2e-3")
    assert r.code == 2
    assert "DDP inside a multirun sweep" in r.err


def test_fsdp_without_gpus_is_a_clear_usage_error(cli, corpus):
    r = cli("pretrain", *ARGS, f"data.path={corpus}", "trainer=fsdp")
    assert r.code == 2 and "trainer=fsdp needs CUDA GPUs" in r.err and "trainer=ddp" in r.err


def test_fsdp_wraps_each_transformer_block():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from bigml.training.trainer import block_classes, fsdp_strategy

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert block_classes(model) == {GPT2Block}
    strategy = fsdp_strategy(model, {"activation_checkpointing": True, "state_dict_type": "sharded"})
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {GPT2Block}
