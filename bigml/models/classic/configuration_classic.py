"""Configs of bigml's non-transformer architectures (MLP, CNN, tabular nets, recurrent LMs, DCGAN).

This file is copied into every model directory that holds one of these models (transformers'
`register_for_auto_class`), so it imports nothing but transformers: the directory then loads with
`AutoModel*.from_pretrained(dir, trust_remote_code=True)` on a machine without bigml.
"""

from transformers import PretrainedConfig


def _size(image_size) -> list:
    """[height, width] from an int (square) or a pair."""
    return [int(image_size), int(image_size)] if isinstance(image_size, (int, float)) else [int(s) for s in image_size]


class BigmlImageMLPConfig(PretrainedConfig):
    """The MNIST multilayer perceptron: flattened pixels -> dense layers with ReLU and dropout."""

    model_type = "bigml_image_mlp"

    def __init__(self, num_channels=1, image_size=28, hidden_sizes=(256, 128), dropout=0.2, **kwargs):
        self.num_channels = int(num_channels)
        self.image_size = _size(image_size)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.dropout = float(dropout)
        super().__init__(**kwargs)


class BigmlCNNConfig(PretrainedConfig):
    """A small convnet: blocks of 3x3 conv, batch norm, ReLU, 2x2 max pool; then a dense layer."""

    model_type = "bigml_cnn"

    def __init__(self, num_channels=1, image_size=28, channels=(32, 64), hidden_size=128, dropout=0.25, **kwargs):
        self.num_channels = int(num_channels)
        self.image_size = _size(image_size)
        self.channels = [int(c) for c in channels]
        self.hidden_size = int(hidden_size)
        self.dropout = float(dropout)
        super().__init__(**kwargs)


class BigmlTabularConfig(PretrainedConfig):
    """Numeric features in, a label or a number out. No hidden layers: linear / logistic regression.

    The feature standardization fitted on the training split lives in the weights (buffers
    feature_mean, feature_std; for regression also target_mean, target_std), so the model takes
    raw feature values."""

    model_type = "bigml_tabular"

    def __init__(self, num_features=1, hidden_sizes=(), dropout=0.0, feature_names=None, label_column=None,
                 feature_mean=None, feature_std=None, target_mean=0.0, target_std=1.0, **kwargs):
        self.num_features = int(num_features)
        # the standardization fitted on the training split (the weights' buffers hold the same values)
        self.feature_mean = [float(v) for v in feature_mean] if feature_mean is not None else None
        self.feature_std = [float(v) for v in feature_std] if feature_std is not None else None
        self.target_mean, self.target_std = float(target_mean), float(target_std)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.dropout = float(dropout)
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.label_column = label_column
        super().__init__(**kwargs)


class BigmlRNNConfig(PretrainedConfig):
    """A recurrent language model (LSTM or GRU): embedding -> recurrent layers -> vocabulary."""

    model_type = "bigml_rnn"

    def __init__(self, vocab_size=256, embedding_size=128, hidden_size=256, num_layers=2, cell="lstm", dropout=0.0,
                 **kwargs):
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be lstm or gru, not {cell!r}")
        self.vocab_size = int(vocab_size)
        self.embedding_size = int(embedding_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.cell = cell
        self.dropout = float(dropout)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class BigmlDCGANConfig(PretrainedConfig):
    """DCGAN (Radford et al. 2016) at small sizes: the generator maps latent_dim noise to an image
    with two stride-2 transposed convolutions, so the image sides are multiples of 4."""

    model_type = "bigml_dcgan"

    def __init__(self, latent_dim=64, num_channels=1, image_size=28, base_channels=64, **kwargs):
        self.latent_dim = int(latent_dim)
        self.num_channels = int(num_channels)
        self.image_size = _size(image_size)
        self.base_channels = int(base_channels)
        super().__init__(**kwargs)
