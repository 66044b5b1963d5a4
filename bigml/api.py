"""bigml as a library: run a command in this process and get its metrics back.

    import bigml
    metrics = bigml.run("pretrain", ["model=gpt-tiny", "trainer.max_steps=10"])
    metrics["val_loss"]

The overrides are the command line's (`key=value`, `group=preset`, `+key=value`), composed with
Hydra's compose API: no Hydra app, no sys.argv, so it works in notebooks, scripts and CI jobs.
Errors are the CLI's: bigml.errors.UsageError (and its ConfigError / DataError) where the CLI
exits 2, GateFailed / TrainingDiverged / other BigmlError where it exits 1. A sweep (`-m`) is the
CLI's job; from Python, loop over `run` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigml.errors import UsageError


def run(command: str, overrides: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run `bigml <command> <overrides...>` and return the metrics it wrote to metrics.json."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from bigml import cli
    from bigml.commands import COMMANDS
    from bigml.commands.runner import run_job
    from bigml.errors import did_you_mean

    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; choose one of {', '.join(COMMANDS)}")
    args = [str(a) for a in (overrides or [])]
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in args):
        raise UsageError("bigml.run takes overrides only (key=value); sweeps and flags belong to the CLI: "
                         "loop over bigml.run calls instead")
    from bigml import resolvers

    resolvers.register()
    args, scratch = cli.prepare_overrides(command, args)
    previous = GlobalHydra.instance().is_initialized()
    if previous:  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=cli._config_dir(), version_base="1.3"):
            try:
                cfg = compose(command, args, return_hydra_config=True)
            except Exception as e:  # composition errors: the CLI's one line, as a UsageError
                code, line = cli.explain(e)
                raise (UsageError(line) if code == 2 else e) from None
            out = Path(str(cfg.hydra.run.dir)).expanduser().absolute()
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(out)
                cfg.hydra.mode = RunMode.RUN
            HydraConfig.instance().set_config(cfg)
            job_cfg = cfg.copy()
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            metrics = run_job(command, f"bigml.commands.{command}", job_cfg)
            written = out / "metrics.json"  # what a CI script would read: the same dict, with its status
            if command not in cli.NO_RUN_DIR and written.exists():
                import json

                return json.loads(written.read_text())
            return metrics
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        if not previous and GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
