"""Tasks as modules: the registry and conf/task agree, inference from model directories, and the
structure rule (no task-name comparisons outside bigml/tasks/, no import cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def _yaml_task_name(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    return data["task"]["name"] if "task" in data else data["name"]  # @package _global_ presets nest it


def test_every_task_config_has_a_task_module_and_back():
    from bigml.tasks import all_tasks

    configs = {_yaml_task_name(p): p for p in (REPO / "conf" / "task").glob("*.yaml") if p.stem != "auto"}
    assert set(configs) == set(all_tasks()), "conf/task/*.yaml and bigml/tasks/ must name the same tasks"
    for name, path in configs.items():
        assert path.stem == name  # task=<name> selects it
        task = all_tasks()[name]
        assert task.metric in task.metrics, name  # the default early-stopping metric is one it reports
        assert task.headline_metric in task.metrics, name


def test_unknown_task_names_the_choices(cli, labeled_csv, tmp_path):
    from bigml.tasks import get_task

    with pytest.raises(Exception, match="did you mean classification"):
        get_task("clasification")
    r = cli("finetune", "task=masked_lm", f"data.path={labeled_csv}", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and "cannot be finetuned" in r.err and "sft" in r.err


@pytest.mark.parametrize("arch, extra, expected", [
    ("BertForSequenceClassification", {"num_labels": 3}, "classification"),
    ("BertForSequenceClassification", {"num_labels": 1}, "regression"),
    ("BertForSequenceClassification", {"num_labels": 4, "problem_type": "multi_label_classification"}, "multilabel"),
    ("BertForTokenClassification", {"num_labels": 5}, "token"),
    ("BertForMaskedLM", {}, "masked_lm"),
    ("BertModel", {}, "masked_lm"),  # a bare encoder: its family's objective
])
def test_task_inferred_from_the_head(arch, extra, expected):
    from transformers import BertConfig

    from bigml.tasks import infer_task

    config = BertConfig(architectures=[arch], **extra)
    assert infer_task(config).name == expected


def test_recorded_task_wins_only_when_the_head_fits():
    from transformers import GPT2Config

    from bigml.tasks import infer_task

    lm = GPT2Config(architectures=["GPT2LMHeadModel"])
    assert infer_task(lm).name == "causal_lm"
    assert infer_task(lm, {"task": "sft"}).name == "sft"
    assert infer_task(GPT2Config(architectures=["GPT2ForSequenceClassification"], num_labels=2), {"task": "sft"}).name \
        == "classification"


def test_structure_check_passes():
    tool = REPO.parent / "shared" / "tools" / "check_structure.py"
    if not tool.exists():
        pytest.skip("the shared structure check is not beside this checkout")
    p = subprocess.run([sys.executable, str(tool)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
