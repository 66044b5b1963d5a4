"""bigml: pretrain, finetune, evaluate, generate with and compress transformer models from one CLI."""

__version__ = "0.1.0"
