"""bigml: pretrain, finetune, evaluate, generate with and compress transformer models from one CLI."""

__version__ = "0.1.0"

import logging as _logging

# torchao (a bigml dependency, which transformers imports whenever it is installed) announces at
# import that its optional CUDA / Triton kernels are missing, and torch warns about its enum
# registrations: noise on every CPU command. Real errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def run(command: str, overrides=None) -> dict:
    """Run a bigml command in this process and return its metrics: bigml.run("pretrain", ["model=gpt-tiny"]).
    See bigml.api.run."""
    from bigml.api import run as _run

    return _run(command, overrides)
