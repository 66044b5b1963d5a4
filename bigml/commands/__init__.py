"""One module per command; each exposes `run(cfg) -> dict` (the metrics it writes to metrics.json).

Importing a command module is deferred until it runs, so `bigml --help` stays instant. COMMANDS
says, for each command, what `--help`, completion and the start-up checks need to know: its
summary, the kinds of data presets it reads (conf/data/*.yaml `kind`), and the presets of shared
groups it accepts (conf/method holds finetune's and compress's methods). conf/<command>.yaml is its
config (tests/test_cli.py keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    summary: str
    data_kinds: tuple[str, ...] = ()  # empty: the command reads no data preset
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> the presets it accepts

    def __str__(self) -> str:
        return self.summary


COMMANDS: dict[str, Command] = {
    "pretrain": Command("pretrain a masked LM (BERT-style) or causal LM (GPT/Llama-style) from scratch; a GAN on images",
                        data_kinds=("corpus", "images")),
    "finetune": Command("adapt a model to a task: classify, regress, tag; instruction (sft) and preference (dpo) tuning",
                        data_kinds=("labeled", "chat", "preferences", "images"), presets={"method": ("full", "lora")}),
    "eval": Command("score a model: task metrics, perplexity, a JSON report, CI gates",
                    data_kinds=("labeled", "corpus", "chat", "preferences", "images")),
    "generate": Command("decode text with a causal LM, or fill [MASK] with a masked LM"),
    "compress": Command("quantize, prune or distill a model, with a before/after report",
                        data_kinds=("labeled", "corpus", "chat", "preferences"),
                        presets={"method": ("quantize", "prune", "distill")}),
    "serve": Command("answer HTTP requests with a model (OpenAI-compatible completions, predict, fill-mask)"),
    "export": Command("write a model as ONNX or GGUF, checked against PyTorch"),
}
