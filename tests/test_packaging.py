"""bigml as a user installs it: a wheel, the console script, run from outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_GPT, TINY_RUN


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """Build a wheel of this checkout and install it (without dependencies) into a fresh prefix."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = list((tmp / "dist").glob("bigml-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", tmp / "site", wheel],
                   check=True, capture_output=True)
    return tmp / "site"


def test_wheel_ships_the_configs(wheel_install):
    conf = wheel_install / "bigml" / "conf"
    assert (conf / "pretrain.yaml").exists()
    assert (conf / "model" / "bert-tiny.yaml").exists()
    assert (conf / "arch" / "llama.yaml").exists()


def test_wheel_console_script_trains_outside_the_repo(wheel_install, env, corpus, tmp_path):
    e = {**env, "PYTHONPATH": str(wheel_install)}
    script = wheel_install / "bin" / "bigml"
    where = subprocess.run([sys.executable, "-c", "import bigml; print(bigml.__file__)"], env=e, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(wheel_install)), where  # the wheel's copy, not the checkout
    r = subprocess.run([sys.executable, script, "pretrain", *TINY_RUN, *TINY_GPT, f"data.path={corpus}",
                        "trainer.max_steps=4"], env=e, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (metrics,) = list((Path(env["BIGML_OUTPUT_ROOT"])).glob("pretrain/*/metrics.json"))
    assert json.loads(metrics.read_text())["status"] == "completed"
    assert str(REPO) not in os.path.realpath(metrics)
