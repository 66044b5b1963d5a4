"""One module per command; each exposes `run(cfg) -> dict` (the metrics it writes to metrics.json).

Importing a command module is deferred until it runs, so `bigml --help` stays instant.
"""

COMMANDS: dict[str, str] = {
    "pretrain": "pretrain a masked LM (BERT-style) or causal LM (GPT/Llama-style) from scratch",
    "finetune": "adapt a model to classification, regression or token labels (full or LoRA)",
    "eval": "score a model: task metrics, perplexity, a JSON report, CI gates",
    "generate": "decode text with a causal LM, or fill [MASK] with a masked LM",
    "compress": "quantize, prune or distill a model, with a before/after report",
    "serve": "answer HTTP requests with a model (OpenAI-compatible completions, predict, fill-mask)",
    "export": "write a model as ONNX or GGUF, checked against PyTorch",
}
