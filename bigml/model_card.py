"""The model card: a README.md in every model directory bigml writes, in the Hugging Face format
(YAML front matter that the Hub and other tools read, then prose for people).

    write_card(model_dir, metrics=None, run_dir=None, export=None)

Everything comes from what is already on disk: config.json (architecture, labels), bigml.json
(the command, the task, the source model), the run directory's .hydra/config.yaml and
overrides.yaml (how it was trained) and metrics.json (how it scored). A card written before the
run has its metrics (RunDir.export_model) is rewritten when metrics.json is (RunDir.write_metrics).

Front matter: library_name, pipeline_tag, tags, base_model, datasets, metrics, and a model-index
with the metric values. Body: what the model is, how it was trained (the command line and the key
settings, the whole resolved config folded away), its metrics, and how to load and run it.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import yaml

from bigml.atomic import atomic_write_bytes

log = logging.getLogger("bigml")

# transformers' auto class -> the Hub's pipeline tag
PIPELINE_TAGS = {"AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForTokenClassification": "token-classification",
                 "AutoModelForCausalLM": "text-generation", "AutoModelForMaskedLM": "fill-mask"}
KEY_SETTINGS = ("task.name", "model.path", "model.name", "data.name", "data.path", "data.hf_name", "method.name",
                "optimizer.lr", "trainer.max_epochs", "trainer.max_steps", "trainer.precision", "data.max_length",
                "data.block_size", "data.batch_size", "quantize.dtype", "quantize.backend", "prune.sparsity",
                "distill.student", "seed")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def _get(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _task(config: dict, meta: dict):
    """The task object of the model (None when bigml cannot tell)."""
    try:
        from transformers import PretrainedConfig

        from bigml.tasks import get_task, infer_task

        if meta.get("task"):
            return get_task(meta["task"])
        return infer_task(PretrainedConfig.from_dict(config), meta)
    except Exception:  # noqa: BLE001 - a card never fails a run
        return None


def render(model_dir: Path, metrics: dict | None = None, run_dir: Path | None = None, export: dict | None = None,
           location: Path | None = None) -> str:
    """The card of `model_dir`; `location` is where the directory will be (it may be written under a
    temporary name first) for the snippets."""
    config = _read_json(model_dir / "config.json")
    meta = _read_json(model_dir / "bigml.json")
    if export is not None:  # an exported copy: describe the model it was exported from
        source = Path(export["source"])
        config = config or _read_json(source / "config.json")
        meta = _read_json(source / "bigml.json") or meta
    run_dir = run_dir or (Path(meta["run_dir"]) if meta.get("run_dir") else None)
    resolved = _read_yaml(run_dir / ".hydra" / "config.yaml") if run_dir else None
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") if run_dir else None
    if metrics is None and run_dir is not None:
        metrics = _read_json(run_dir / "metrics.json") or None
    task = _task(config, meta)
    command = meta.get("command") or (metrics or {}).get("command")
    name = run_dir.name if run_dir else (location or model_dir).resolve().name
    auto_class = task.auto_class_name if task is not None else "AutoModel"
    model_type = config.get("model_type", "model")

    # -- the metric values ----------------------------------------------------------------------------
    values: dict[str, float] = {}
    if metrics:
        if isinstance(metrics.get("after"), dict):  # compress: the model is the "after" column
            values = _numbers(metrics["after"])
        else:
            values = _numbers(metrics)
    task_metrics = set(task.metrics) - {"examples", "tokens"} if task is not None else set()
    prefix = next((p for p in ("test_", "val_") if any(k.startswith(p) for k in values)), "")
    headline = {k: v for k, v in values.items() if k.startswith(prefix) and k[len(prefix):] in task_metrics}

    # -- front matter ---------------------------------------------------------------------------------
    tags = ["bigml", *([task.name] if task is not None else []), model_type]
    if command:
        tags.append(f"bigml-{command}")
    if export is not None:
        tags.append(export["format"])
    quant = config.get("quantization_config") or config.get("bigml_quantization")
    if quant:
        tags += ["quantized", str(quant.get("quant_method") or quant.get("scheme") or "")]
    front: dict[str, Any] = {"library_name": export["format"] if export else "transformers", "tags": [t for t in tags if t]}
    if auto_class in PIPELINE_TAGS:
        front["pipeline_tag"] = PIPELINE_TAGS[auto_class]
    base = meta.get("source") or _get(resolved or {}, "model.path")  # null: trained from scratch
    if export is not None:
        base = export["source"]
    if base and base != "None":
        front["base_model"] = str(base)
    data = resolved.get("data") if isinstance(resolved, dict) else None
    if isinstance(data, dict):
        dataset = data.get("hf_name") or (data.get("path") if data.get("name") in ("labeled", "text", "chat") else None) \
            or data.get("name")
        if dataset:
            front["datasets"] = [str(dataset)]
    if headline:
        front["metrics"] = sorted(k[len(prefix):] for k in headline)
        results = [{"type": k[len(prefix):], "name": k, "value": v} for k, v in sorted(headline.items())]
        index = {"name": name, "results": [{"task": {"type": front.get("pipeline_tag", "other")}, "metrics": results}]}
        if front.get("datasets"):
            split = {"test_": "test", "val_": "validation"}.get(prefix)
            index["results"][0]["dataset"] = {"name": front["datasets"][0], "type": front["datasets"][0],
                                              **({"split": split} if split else {})}
        front["model-index"] = [index]

    # -- body -----------------------------------------------------------------------------------------
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", ""]
    kind = f"A {task.name.replace('_', ' ')} model: {task.summary}." if task is not None else "A transformer model."
    arch = f"{model_type}, {config.get('num_hidden_layers', config.get('n_layer', '?'))} layers x " \
           f"{config.get('hidden_size', config.get('n_embd', '?'))}, vocabulary {config.get('vocab_size', '?')}"
    lines.append(f"{kind} Architecture: {arch}.{f' Written by `bigml {command}`.' if command else ''}")
    labels = config.get("id2label")
    if labels and task is not None and task.finetunable and not task.numeric_target:
        lines += ["", f"Labels: {', '.join(str(labels[k]) for k in sorted(labels, key=lambda x: int(x)))}."]
    if export is not None:
        lines += ["", f"This directory holds the model in **{export['format'].upper()}** format "
                      f"(`{export['file']}`), exported by `bigml export` from `{export['source']}`; "
                      f"{export.get('check', '')}"]
    if quant:
        lines += ["", f"Quantized ({json.dumps(quant, default=str)[:300]})."]

    lines += ["", "## How it was trained", ""]
    if overrides is not None and command:
        args = " ".join(shlex.quote(str(o)) for o in overrides)
        lines += ["```bash", f"bigml {command} {args}".rstrip(), "```", ""]
    settings = [(k, _get(resolved, k)) for k in KEY_SETTINGS] if isinstance(resolved, dict) else []
    settings = [(k, v) for k, v in settings if v not in (None, "", "None")]
    if settings:
        lines += ["| setting | value |", "|---|---|", *[f"| `{k}` | {v} |" for k, v in settings], ""]
    if isinstance(resolved, dict):
        lines += ["<details><summary>The whole resolved config (.hydra/config.yaml)</summary>", "", "```yaml",
                  yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", "</details>", ""]
    elif not (overrides or settings):
        lines += ["No run directory was recorded with this model.", ""]

    lines += ["## Metrics", ""]
    if values:
        source = "metrics.json of the run" + (" (after compression; `before` is the input model)" if metrics.get("after") else "")
        shown = headline or values
        split = {"test_": " (test split)", "val_": " (validation split)"}.get(prefix, "")
        lines += [f"From {source}{split}; the file has the rest (timings, sizes):", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(shown.items())]]
        if metrics.get("after") and isinstance(metrics.get("before"), dict):
            keys = [k for k in ("params", "size_mb", "latency_ms", *sorted(task_metrics)) if k in metrics["before"]]
            lines += ["", "| | input | this model |", "|---|---|---|",
                      *[f"| {k} | {metrics['before'][k]} | {metrics['after'].get(k)} |" for k in keys]]
        lines.append("")
    else:
        lines += ["metrics.json is written when the run ends (this card is then rewritten with them).", ""]
    lines += ["## How to use it", ""] + _usage(location or model_dir, auto_class, task, export, bool(quant))
    return "\n".join(lines).rstrip() + "\n"


def _usage(model_dir: Path, auto_class: str, task, export: dict | None, quantized: bool) -> list[str]:
    where = str(model_dir)
    if export is not None and export["format"] == "onnx":
        return ["```python", "import onnxruntime as ort", "from transformers import AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{where}")',
                f'session = ort.InferenceSession("{where}/{export["file"]}", providers=["CPUExecutionProvider"])',
                'batch = tok(["some text"], return_tensors="np")',
                f'logits = session.run(["logits"], {{k: batch[k] for k in {list(export.get("inputs", ["input_ids"]))}}})[0]',
                "```"]
    if export is not None and export["format"] == "gguf":
        return ["```bash", f"llama-cli -m {where}/{export['file']} -p \"Once upon a time\" -n 64   # llama.cpp", "```", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer   # needs `pip install gguf`",
                f'model = AutoModelForCausalLM.from_pretrained("{where}", gguf_file="{export["file"]}")',
                f'tok = AutoTokenizer.from_pretrained("{where}", gguf_file="{export["file"]}")', "```"]
    lines = ["```python", f"from transformers import {auto_class}, AutoTokenizer"
             + ("   # the int8 weights need `pip install torchao`" if quantized else ""), "",
             f'model = {auto_class}.from_pretrained("{where}")', f'tok = AutoTokenizer.from_pretrained("{where}")', "```", ""]
    cli = ["```bash"]
    if task is not None and "predict" in task.endpoints:
        cli += [f"bigml eval model.path={where} data.path=test.csv        # score it",
                f"bigml serve model.path={where}                           # POST /v1/predict"]
    elif task is not None and "completions" in task.endpoints:
        cli += [f'bigml generate model.path={where} prompt="Once upon a time"',
                f"bigml serve model.path={where}    # OpenAI-compatible /v1/completions"]
    elif task is not None and "fill_mask" in task.endpoints:
        cli += [f'bigml generate model.path={where} prompt="The capital of France is [MASK]."',
                f"bigml serve model.path={where}    # POST /v1/fill-mask"]
    if task is not None and "completions" in task.endpoints and not quantized:
        cli.append(f"bigml export model.path={where} format=gguf output=<dir>    # for llama.cpp")
    elif not quantized:
        cli.append(f"bigml export model.path={where} format=onnx output=<dir>    # for onnxruntime")
    return lines + cli + ["```"] if len(cli) > 1 else lines


def write_card(model_dir: str | Path, metrics: dict | None = None, run_dir: str | Path | None = None,
               export: dict | None = None, location: str | Path | None = None) -> Path | None:
    """Write <model_dir>/README.md; a card that cannot be written is a warning, never a failed run."""
    model_dir = Path(model_dir)
    try:
        text = render(model_dir, metrics, Path(run_dir) if run_dir else None, export, Path(location) if location else None)
        atomic_write_bytes(model_dir / "README.md", text.encode())
        return model_dir / "README.md"
    except Exception as e:  # noqa: BLE001
        log.warning("warning: could not write the model card in %s (%s: %s)", model_dir, type(e).__name__, e)
        return None
