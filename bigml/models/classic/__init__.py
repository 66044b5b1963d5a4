"""bigml's own architectures (bigml.models.classic): image MLP and CNN classifiers, tabular nets,
LSTM / GRU language models and the DCGAN generator, as transformers models.

Importing this package registers them twice over:
- with transformers' Auto classes (AutoConfig + AutoModelFor*), so `from_pretrained` finds them in
  any process that imported bigml;
- for `save_pretrained` to copy configuration_classic.py and modeling_classic.py into the model
  directory and record an `auto_map` in config.json, so the directory also loads without bigml:
  `AutoModelForImageClassification.from_pretrained(dir, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .configuration_classic import (
    BigmlCNNConfig,
    BigmlDCGANConfig,
    BigmlImageMLPConfig,
    BigmlRNNConfig,
    BigmlTabularConfig,
)
from .modeling_classic import (
    BigmlCNNForImageClassification,
    BigmlDCGANDiscriminator,
    BigmlDCGANGenerator,
    BigmlImageMLPForImageClassification,
    BigmlRNNForCausalLM,
    BigmlTabularModel,
)

REGISTERED = (
    (BigmlImageMLPConfig, BigmlImageMLPForImageClassification, AutoModelForImageClassification),
    (BigmlCNNConfig, BigmlCNNForImageClassification, AutoModelForImageClassification),
    (BigmlTabularConfig, BigmlTabularModel, AutoModel),
    (BigmlRNNConfig, BigmlRNNForCausalLM, AutoModelForCausalLM),
    (BigmlDCGANConfig, BigmlDCGANGenerator, AutoModel),
)

for _config, _model, _auto in REGISTERED:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    _auto.register(_config, _model, exist_ok=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class(_auto.__name__)

MODEL_TYPES = frozenset(c.model_type for c, _, _ in REGISTERED)

__all__ = ["MODEL_TYPES", "BigmlCNNConfig", "BigmlCNNForImageClassification", "BigmlDCGANConfig",
           "BigmlDCGANDiscriminator", "BigmlDCGANGenerator", "BigmlImageMLPConfig",
           "BigmlImageMLPForImageClassification", "BigmlRNNConfig", "BigmlRNNForCausalLM", "BigmlTabularConfig",
           "BigmlTabularModel"]
