"""`bigml <command> [key=value ...]`: dispatch to the command's Hydra app.

sys.argv is left as the user typed it while the command runs: Lightning's DDP launcher starts
ranks > 0 by re-running sys.argv, and they must land in the same command with the same overrides.
Hydra parses a copy without the command name.

Errors: Hydra is told to raise (HYDRA_FULL_ERROR) so that every failure reaches `explain`, which
turns it into one line and an exit code (2 for usage/config/data errors, 1 otherwise). The full
traceback is printed for unexpected errors, and for all errors with BIGML_DEBUG=1 or HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback

from bigml import __version__
from bigml.commands import COMMANDS
from bigml.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, BigmlError, Preempted, UsageError, did_you_mean

USAGE = f"""bigml {__version__}: the lifecycle of a transformer model, driven by YAML configs.

usage: bigml <command> [key=value ...] [-m] [--cfg job] [--help]
       bigml completion bash|zsh            # shell completion: source <(bigml completion bash)

commands:
{chr(10).join(f"  {name:<10}{desc}" for name, desc in COMMANDS.items())}

examples:
  bigml pretrain model=bert-small data.path=my_corpus/
  bigml pretrain -m optimizer.lr=1e-4,3e-4            # a sweep, one run directory per job
  bigml finetune model.path=runs/pretrain/<run>/model data.path=train.csv
  bigml eval model.path=runs/finetune/<run>/model data.path=test.csv
  bigml generate model.path=runs/pretrain/<run>/model prompt="def main("

`bigml <command> --help` lists its config groups and keys; `--cfg job` prints the composed config.
Runs go to ./runs (BIGML_OUTPUT_ROOT). Exit codes: 0 ok, 1 runtime failure, 2 usage/config/data error.
"""


def _config_dir() -> str:
    """Absolute path of the packaged configs (conf/ in the repo, bigml/conf in a wheel)."""
    from importlib.resources import files

    return str(files("bigml.conf"))


def _debug_requested() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("BIGML_DEBUG", "HYDRA_FULL_ERROR"))


def explain(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for any exception that escaped a command."""
    from hydra.errors import (
        ConfigCompositionException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, BigmlError):
        return exc.exit_code, str(exc)
    m = re.search(r"Could not load '([\w/-]+)/([^'/]+)'", str(exc))
    if isinstance(exc, (ConfigCompositionException, MissingConfigException)) and m:  # a preset in a list: callbacks=[x]
        from bigml.help import conf_dir

        group, name = m.groups()
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        return EXIT_USAGE, (f"{group}={name}: no such {group} preset{did_you_mean(name, options)}; "
                            f"choose one of {', '.join(options)}")
    if isinstance(exc, MissingConfigException):
        # "Could not find 'model/bert-smal'\n\nAvailable options in 'model':\n\tbert-base ..."
        msg = str(exc)
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
        block = re.search(r"Available options in '[^']+':\n((?:\t\S+\n?)+)", msg)
        options = re.findall(r"^\t(\S+)", block.group(1), re.M) if block else []
        if m and options:
            group, name = m.groups()
            return EXIT_USAGE, (f"{group}={name}: no such {group} preset{did_you_mean(name, options)}; "
                                f"choose one of {', '.join(options)}")
        return EXIT_USAGE, msg.splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return EXIT_USAGE, f"cannot parse the override: {str(exc).splitlines()[0]} (use key=value)"
    m = re.search(r"Could not override '([\w/]+)'\. No match in the defaults list", str(exc))
    if isinstance(exc, ConfigCompositionException) and m:
        return EXIT_USAGE, (f"{m.group(1)}=...: this command has no {m.group(1)} group; "
                            f"`bigml <command> --help` lists the groups it has")
    if isinstance(exc, (ConfigCompositionException, OmegaConfBaseException)):
        inner = exc
        while isinstance(inner, ConfigCompositionException) and (inner.__cause__ or inner.__context__):
            inner = inner.__cause__ or inner.__context__
        return EXIT_USAGE, _explain_omegaconf(exc, inner)
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__
        if isinstance(cause, (ImportError, ModuleNotFoundError)):
            mod = getattr(cause, "name", None) or str(cause)
            return EXIT_USAGE, f"{mod} is not installed; pip install {str(mod).split('.')[0]}"
        m = re.search(r"(No module named '[^']+')", str(exc))
        if m:
            return EXIT_USAGE, f"{m.group(1)}: install it with pip"
        return EXIT_USAGE, str(exc).splitlines()[0]
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return EXIT_FAILURE, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _explain_omegaconf(outer: BaseException, inner: BaseException | None) -> str:
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    text = str(outer)
    exc = inner if inner is not None else outer
    full_key = getattr(exc, "full_key", None)
    if not full_key:
        m = re.search(r"full_key: (\S+)", str(exc)) or re.search(r"Could not override '([^']+)'", text)
        full_key = m.group(1) if m else None
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc):
        key = full_key or "?"
        parent, _, leaf = key.rpartition(".")
        siblings = _siblings(outer, parent)
        hint = did_you_mean(leaf, siblings).replace("mean ", f"mean {parent}." if parent else "mean ")
        return (f"{key}: unknown key{hint}; `--cfg job` lists the keys, "
                f"and +{key}=... adds a key that is not in the config")
    if isinstance(exc, ValidationError):
        m = re.search(r"Value '([^']*)' (?:could not be converted to|is not a valid) (\w+)", str(exc))
        if m and full_key:
            return f"{full_key}={m.group(1)}: expected {m.group(2).lower()}"
        return f"{full_key or 'config'}: {str(exc).splitlines()[0]}"
    if isinstance(exc, MissingMandatoryValue):
        return f"{full_key}: required, set it with {full_key}=..."
    for candidate in (str(outer), str(exc)):
        if candidate.strip():
            line = candidate.strip().splitlines()[0]
            return f"{full_key}: {line}" if full_key and full_key not in line else line
    return type(exc).__name__


def _siblings(exc: BaseException, parent: str) -> list[str]:
    """Keys next to an unknown one, for did-you-mean (from the config attached to the error)."""
    from omegaconf import OmegaConf

    for e in (exc, exc.__cause__, exc.__context__):
        node = getattr(e, "parent_node", None) or getattr(e, "object_type", None)
        if node is not None and OmegaConf.is_dict(node):
            return [str(k) for k in node.keys()]
    return []


# Keys whose values are free text (prompts, stop strings): passed to Hydra quoted, so that what the
# shell delivered arrives unchanged, whatever characters it holds ([ ] , = : ' " $ { } \ ...).
# Commands that write only where the user says (generate, export: output=) or nothing at all (serve),
# so they get no run directory.
NO_RUN_DIR = ("generate", "serve", "export")
FREE_TEXT_KEYS: dict[str, tuple[str, ...]] = {"generate": ("prompt", "stop"), "finetune": ("sft.template",),
                                               "eval": ("sft.template",)}


def hydra_quote(text: str) -> str:
    """`text` as a single-quoted Hydra override value that parses back to exactly `text`.

    In Hydra's grammar a quoted value keeps everything literally except quotes (escaped with a
    backslash), backslashes right before a quote or at the end (doubled), and `${...}`
    interpolations, which OmegaConf reads unless the `$` is escaped as `\\${`.
    """
    out = []
    i = 0
    while i < len(text):
        m = re.match(r"\\\\*", text[i:])
        if m:  # a run of backslashes: doubled when a quote, `${` or the end follows
            run = m.group(0)
            nxt = text[i + len(run):]
            doubled = nxt == "" or nxt.startswith(("'", "${"))
            out.append(run * 2 if doubled else run)
            i += len(run)
            continue
        ch = text[i]
        if ch == "'":
            out.append("\\'")
        elif text.startswith("${", i):
            out.append("\\$")
        else:
            out.append(ch)
        i += 1
    return "'" + "".join(out) + "'"


def quote_free_text(command: str, args: list[str]) -> list[str]:
    """Rewrite `prompt=<raw>` into `prompt='<escaped>'` for the command's free-text keys.

    The value is taken as the shell delivered it (`prompt=null` stays null); `stop=["a","b"]` (a JSON
    list of strings) becomes a Hydra list of quoted strings.
    """
    keys = FREE_TEXT_KEYS.get(command, ())
    if not keys:
        return args
    import json

    out = []
    for a in args:
        m = re.fullmatch(r"(\+{0,2})([\w.]+)=(.*)", a, re.S)
        if not m or m.group(2) not in keys:
            out.append(a)
            continue
        prefix, key, raw = m.groups()
        if raw in ("null", "~"):
            out.append(a)
            continue
        value = None
        if raw.startswith("[") and raw.endswith("]"):
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out.append(f"{prefix}{key}=[{','.join(hydra_quote(v) for v in value)}]")
        else:
            out.append(f"{prefix}{key}={hydra_quote(raw)}")
    return out


# Keys whose children are open: any metric name may follow `eval.fail_below.` / `eval.fail_above.`,
# so the config does not list every task's metrics (a new task would have to edit conf/eval.yaml).
# Hydra refuses keys a config does not have unless the override is `++key=value` (add or
# override): that prefix is added here, and check_gates names the metrics that exist.
OPEN_KEYS = re.compile(r"(eval\.fail_(?:below|above)\.[\w.-]+)=(.*)", re.S)


def open_keys(args: list[str]) -> list[str]:
    return [f"++{a}" if OPEN_KEYS.fullmatch(a) else a for a in args]


def _override_value(overrides: list[str], key: str) -> str | None:
    value = None
    for o in overrides:
        if o.startswith(f"{key}="):
            value = o.split("=", 1)[1].strip("'\"")
    return value


def _redirect_resume(command: str, overrides: list[str]) -> list[str]:
    """resume=auto|<run dir>|<ckpt>: run in the resumed run's directory (unless hydra.run.dir is set)."""
    value = _override_value(overrides, "resume")
    if not value or value in ("null", "None", "none") or _override_value(overrides, "hydra.run.dir"):
        return overrides
    from bigml.training.checkpoints import resolve_resume_dir

    run_dir = resolve_resume_dir(value, command, _override_value(overrides, "output_root"))
    if run_dir is None:
        return [o for o in overrides if not o.startswith("resume=")]  # auto, nothing to resume: start fresh
    return overrides + [f"hydra.run.dir={run_dir}"]


def _torchrun_run_dir(command: str, overrides: list[str]) -> list[str]:
    """Under torchrun every rank starts bigml on its own; give them one run directory.

    The directory is named after the rendezvous id (--rdzv-id, shared by all nodes) or, when there
    is none, after the start time of the local torchrun agent (shared by its ranks).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or _override_value(overrides, "hydra.run.dir"):
        return overrides
    import datetime

    import psutil

    from bigml.run_dir import output_root

    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if run_id in ("", "none") or re.fullmatch(r"[0-9a-f]{8}-[0-9a-f-]{27}", run_id):  # torchrun's own uuid
        started = psutil.Process(os.getppid()).create_time()
        name = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d_%H-%M-%S") + "-torchrun"
    else:  # --rdzv-id given by the user: the same on every node (as a plain name: no way out of the root)
        name = "torchrun-" + re.sub(r"[^A-Za-z0-9._-]", "_", run_id).lstrip(".")
    root = _override_value(overrides, "output_root") or str(output_root())
    return overrides + [f"hydra.run.dir={root}/{command}/{name}"]


def prepare_overrides(command: str, args: list[str], inspecting: bool = False) -> tuple[list[str], str | None]:
    """The overrides of a single run as Hydra must see them (free text quoted, open keys, the run
    directory of a resumed or torchrun run), and a scratch run directory to remove afterwards for
    commands that keep none (generate)."""
    args = open_keys(quote_free_text(command, args))
    scratch = None
    if command in NO_RUN_DIR and not _override_value(args, "hydra.run.dir"):
        import tempfile

        scratch = tempfile.mkdtemp(prefix=f"bigml-{command}-")  # Hydra wants a run directory; nothing is kept in it
        args = [*args, f"hydra.run.dir={scratch}"]
    if not inspecting:
        args = _torchrun_run_dir(command, _redirect_resume(command, args))
    return args, scratch


def run_command(command: str, args: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from bigml import resolvers, sweep

    resolvers.register()
    if importlib.util.find_spec(f"bigml.commands.{command}") is None:
        raise UsageError(f"`bigml {command}` is not available in this version yet; see README.md for what is")
    module = f"bigml.commands.{command}"  # imported by run_job, once the config has composed
    original_argv = list(sys.argv)
    failures: list[BaseException] = []
    state = {"stop": False}

    def task(cfg):
        sys.argv = original_argv  # Lightning re-runs sys.argv to start DDP ranks
        from bigml.commands.runner import run_job

        if HydraConfig.get().mode != RunMode.MULTIRUN:
            try:
                return run_job(command, module, cfg)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after Hydra returns
                failures.append(e)  # (raising here makes Hydra print its own, second error message)
                return None
        # A sweep job: a failure is recorded (metrics.json, summary) and the sweep goes on.
        # The return value is the objective an optimizing sweeper (optuna) reads.
        job = HydraConfig.get().job.num
        if state["stop"]:
            return float("nan")
        try:
            metrics = run_job(command, module, cfg)
        except (KeyboardInterrupt, Preempted):  # a preempted sweep stops (exit 143), it does not go on
            raise
        except BaseException as e:  # noqa: BLE001
            code, line = explain(e)
            sys.stderr.write(f"bigml {command}: job {job} failed: {line}\n")
            state["stop"] = bool(cfg.sweep.get("fail_fast", False))
            return float("nan")
        value = metrics.get(str(cfg.sweep.metric)) if isinstance(metrics, dict) else None
        return float(value) if isinstance(value, (int, float)) else float("nan")

    is_multirun = any(a in ("-m", "--multirun") for a in args) or _override_value(args, "hparams_search")
    flags = [a for a in args if a.startswith("-")]
    inspecting = any(f in ("--cfg", "-c", "--help", "-h", "--info", "-i") for f in flags)
    if is_multirun:
        args = open_keys(quote_free_text(command, args))
        scratch = None
        if "TORCHELASTIC_RUN_ID" in os.environ:
            raise UsageError("a multirun sweep under torchrun would run the whole sweep in every rank; "
                             "launch one torchrun per configuration instead")
        if not inspecting:
            sweep.check_sweep(command, _config_dir(), [a for a in args if not a.startswith("-")])
    else:
        args, scratch = prepare_overrides(command, args, inspecting)
    app = hydra.main(config_path=_config_dir(), config_name=command, version_base="1.3")(task)
    sys.argv = [f"bigml {command}", *args]
    sweep.LAST_SWEEP.clear()
    try:
        app()
    except OSError as e:  # Hydra creates the run directory before the command starts
        if e.filename:
            raise UsageError(f"cannot create the run directory {e.filename} ({e.strerror}); "
                             f"set BIGML_OUTPUT_ROOT or hydra.run.dir to a writable place") from None
        raise
    finally:
        sys.argv = original_argv
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    if failures:
        raise failures[0]
    if sweep.LAST_SWEEP.get("failed"):
        s = sweep.LAST_SWEEP
        raise BigmlError(f"{s['failed']} of {s['jobs']} sweep jobs failed; see {s['sweep_dir']}/summary.csv")


def _help(command: str, overrides: list[str]) -> int:
    from bigml.help import render_help

    try:
        sys.stdout.write(render_help(command, open_keys(quote_free_text(command, overrides))))
    except Exception as e:  # noqa: BLE001 - e.g. `--help model=bert-smal`: the one-line error
        code, line = explain(e)
        sys.stderr.write(f"bigml {command}: error: {line}\n")
        return code
    return EXIT_OK


def _shell_completion_request(args: list[str]) -> str | None:
    """Hydra's `-sc install=bash` (its own completion cannot parse `bigml <command>`): bigml's script."""
    for i, a in enumerate(args):
        if a in ("-sc", "--shell-completion") and i + 1 < len(args):
            value = args[i + 1]
            if value.startswith("install="):
                return value.split("=", 1)[1]
            return "?" + value
    return None


def _completion(command: str, args: list[str]) -> int:
    from bigml.help import complete, completion_script

    if command == "__complete":  # called by the shell function: the line typed so far
        sys.stdout.write("\n".join(complete(args[0] if args else "bigml ")) + "\n")
        return EXIT_OK
    if not args or args[0].startswith("?"):
        sys.stderr.write("bigml completion: say which shell: `source <(bigml completion bash)` (or zsh)\n")
        return EXIT_USAGE
    try:
        sys.stdout.write(completion_script(args[0]))
    except UsageError as e:
        sys.stderr.write(f"bigml completion: error: {e}\n")
        return EXIT_USAGE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(USAGE)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return EXIT_OK
    if argv[0] in ("-V", "--version"):
        print(f"bigml {__version__}")
        return EXIT_OK
    command, args = argv[0], argv[1:]
    if command in ("completion", "__complete"):
        return _completion(command, args)
    if command not in COMMANDS:
        sys.stderr.write(f"bigml: unknown command {command!r}{did_you_mean(command, COMMANDS)}; "
                         f"choose one of {', '.join(COMMANDS)} (bigml --help)\n")
        return EXIT_USAGE
    if argv is not None and sys.argv[1:] != argv:
        sys.argv = [sys.argv[0], *argv]  # called as a function (tests): make DDP re-launch see the same
    if any(a in ("-h", "--help") for a in args):  # the command's own help, not Hydra's generic page
        return _help(command, [a for a in args if not a.startswith("-")])
    shell = _shell_completion_request(args)
    if shell is not None:
        return _completion("completion", [shell])
    from bigml.hardware import tune_malloc
    from bigml.run_dir import setup_console_logging
    from bigml.training.distributed import die_with_parent

    die_with_parent()  # a DDP rank > 0 must not outlive rank 0 (it would wait for it until a timeout)
    tune_malloc()
    setup_console_logging()
    debug = _debug_requested()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let every error reach `explain`
    try:
        run_command(command, args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_FAILURE)
    except BaseException as e:  # noqa: BLE001 - the one place every error is reported
        code, line = explain(e)
        if debug or (code == EXIT_FAILURE and not isinstance(e, BigmlError)):  # a bug: show where
            traceback.print_exc()
        sys.stderr.write(f"bigml {command}: error: {line}\n")
        sys.stderr.flush()
        return code
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
