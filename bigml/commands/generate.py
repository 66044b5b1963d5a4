"""`bigml generate`: continue prompts with a causal LM, or fill [MASK] with a masked LM.

Output contract: the text of a single prompt goes to stdout (streamed on a terminal), many prompts
(or several sequences per prompt) go to JSONL (`output=` or stdout); logs and the speed summary go
to stderr. No run directory is kept (bigml/cli.py gives it a scratch one): generate writes only where
`output=` says.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig, ListConfig

from bigml.errors import ConfigError, DataError, UsageError

log = logging.getLogger("bigml")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI runs generate in a scratch Hydra directory that it removes afterwards (bigml/cli.py)."""
    return _run(cfg)


def _check(cfg: DictConfig) -> None:
    if int(cfg.max_new_tokens) <= 0:
        raise ConfigError("max_new_tokens", f"{cfg.max_new_tokens} must be at least 1")
    for key in ("num_beams", "num_return_sequences", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(key, f"{cfg[key]} must be at least 1")
    if str(cfg.prompt_overflow) not in ("truncate", "error"):
        raise ConfigError("prompt_overflow", f"{cfg.prompt_overflow!r} is not truncate or error")
    if cfg.do_sample and float(cfg.temperature) <= 0:
        raise ConfigError("temperature", f"{cfg.temperature} must be > 0 when sampling", "use do_sample=false for greedy decoding")
    if not 0 < float(cfg.top_p) <= 1:
        raise ConfigError("top_p", f"{cfg.top_p} must be in (0, 1]")
    if float(cfg.repetition_penalty) <= 0:
        raise ConfigError("repetition_penalty", f"{cfg.repetition_penalty} must be > 0 (1.0: no penalty)")
    from bigml.decode_speed import parse_compile, parse_quantize, parse_threads

    parse_threads(cfg.threads), parse_compile(cfg.compile), parse_quantize(cfg.quantize)
    if cfg.top_k is not None and int(cfg.top_k) < 1:
        raise ConfigError("top_k", f"{cfg.top_k} must be at least 1")
    if not cfg.do_sample and int(cfg.num_return_sequences) > int(cfg.num_beams):
        raise ConfigError("num_return_sequences", f"{cfg.num_return_sequences} greedy sequences would all be the same",
                          "set do_sample=true, or num_beams >= num_return_sequences")


def _stops(cfg: DictConfig) -> list[str]:
    from bigml.generation import unescape

    stop = cfg.stop
    if stop is None:
        return []
    values = list(stop) if isinstance(stop, (list, ListConfig)) else [stop]
    stops = [unescape(str(s)) for s in values]
    if any(s == "" for s in stops):
        raise ConfigError("stop", "an empty stop string would stop before the first token")
    return stops


def _records(cfg: DictConfig) -> tuple[list[dict[str, Any]], bool]:
    """The prompt records, and whether they came as one prompt (text output) rather than a file."""
    from bigml.generation import read_prompts

    field = str(cfg.prompt_field)
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise UsageError("give prompt=... or prompts_file=..., not both")
    if cfg.prompt is not None:
        text = str(cfg.prompt)
        if not text.strip():
            raise UsageError("prompt is empty; give some text: prompt=\"Once upon a time\"")
        return [{field: text}], True
    if cfg.prompts_file is not None:
        return read_prompts(str(cfg.prompts_file), field), False
    try:
        piped = not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        piped = False
    if piped:
        try:
            text = sys.stdin.read()
        except OSError:
            text = ""
        text = text.rstrip("\n")
        if not text.strip():
            raise UsageError("the prompt piped on standard input is empty")
        return [{field: text}], True
    raise UsageError("no prompt: give prompt=\"...\", prompts_file=<file>, or pipe text on standard input")


def _device(cfg: DictConfig) -> str:
    import torch

    device = str(cfg.device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda is not available on this machine", "use device=auto or device=cpu")
    return device


def _run(cfg: DictConfig) -> dict[str, Any]:
    drawn = _draw_images(cfg)
    if drawn is not None:
        return drawn
    _check(cfg)
    stops = _stops(cfg)
    records, single = _records(cfg)
    field = str(cfg.prompt_field)

    import transformers

    from bigml.data.tokenizer import load_tokenizer
    from bigml.decode_speed import resolve_dtype
    from bigml.models.architectures import describe
    from bigml.models.loading import load_model, model_task, read_config

    path = str(cfg.model.path)
    config = read_config(path)
    task = model_task(config, path)
    if not task.language_model:
        task = _language_model_of(config, task)
    tokenizer = load_tokenizer(path, key="model.path")
    device = _device(cfg)
    dtype = resolve_dtype(str(cfg.precision), device)
    shown = "precision auto" if str(cfg.precision) == "auto" and device == "cpu" else str(dtype).removeprefix("torch.")
    log.info("loading %s (%s, %s, %s)", path, describe(config), task.name, shown)
    model, _ = load_model(path, task, config=config)
    model = model.to(device=device, dtype=dtype).eval()
    transformers.set_seed(int(cfg.seed))
    return task.generate(cfg, model, tokenizer, records, single, field, stops, dtype)


def _draw_images(cfg: DictConfig) -> dict[str, Any] | None:
    """A GAN generator (model=dcgan) draws num_images images into output=<grid>.png; None for
    language models."""
    from bigml.models.loading import load_model, model_task, read_config

    path = str(cfg.model.path)
    config = read_config(path)
    task = model_task(config, path)
    if not task.draws_images:
        return None
    model, _ = load_model(path, task, config=config)
    return task.draw(cfg, model)


def _language_model_of(config, task):
    """A model directory without a language-model head (a bare encoder, say): the objective of its
    family, with the head initialized; a task head (classifier) cannot generate."""
    from bigml.tasks import language_model_task

    archs = list(getattr(config, "architectures", None) or [])
    if task.finetunable:
        raise DataError(f"model.path: a {task.name} model ({archs[0] if archs else config.model_type}) does not generate "
                        f"text; use bigml eval, or a causal / masked language model")
    return language_model_task(config)
