"""bigml's non-transformer architectures as transformers models (PreTrainedModel subclasses).

This file is copied into every model directory that holds one of them (with its sibling
configuration_classic.py), so it imports only torch and transformers: such a directory loads with
`AutoModelForImageClassification / AutoModelForCausalLM / AutoModel.from_pretrained(dir,
trust_remote_code=True)` without bigml, and with bigml installed (which registers these classes)
without trust_remote_code.

`__init__` runs on the meta device inside from_pretrained: sizes are computed with plain Python.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput, ModelOutput

from .configuration_classic import (
    BigmlCNNConfig,
    BigmlDCGANConfig,
    BigmlImageMLPConfig,
    BigmlRNNConfig,
    BigmlTabularConfig,
)

# transformers' config.problem_type for a one-number head (a config field, not a bigml task)
REGRESSION_PROBLEM = "regression"


def _head_loss(config, logits, labels):
    if labels is None:
        return None
    if config.problem_type == REGRESSION_PROBLEM or config.num_labels == 1:
        return F.mse_loss(logits.reshape(-1), labels.float().reshape(-1))
    return F.cross_entropy(logits, labels.long())


def _dense(sizes, dropout):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class _ClassicModel(PreTrainedModel):
    """Keeps PyTorch's default initialization of each layer (Kaiming uniform), which suits these
    small ReLU networks better than the transformers default (normal, std 0.02)."""

    def _init_weights(self, module):
        pass


def _channels(config, pixel_values):
    """A grayscale model fed RGB (transformers' image-classification pipeline converts every image
    to RGB, replicating gray values): the channel mean is the gray image again."""
    if pixel_values.shape[1] != config.num_channels and config.num_channels == 1:
        return pixel_values.mean(1, keepdim=True)
    return pixel_values


class BigmlImageMLPForImageClassification(_ClassicModel):
    config_class = BigmlImageMLPConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        inputs = config.num_channels * math.prod(config.image_size)
        self.body = nn.Sequential(nn.Flatten(), _dense([inputs, *config.hidden_sizes], config.dropout))
        self.classifier = nn.Linear(([inputs, *config.hidden_sizes])[-1], config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        feats = self.body(_channels(self.config, pixel_values))
        logits = self.classifier(feats)
        return ImageClassifierOutput(loss=_head_loss(self.config, logits, labels), logits=logits,
                                     hidden_states=(feats,) if output_hidden_states else None)


class BigmlCNNForImageClassification(_ClassicModel):
    config_class = BigmlCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        layers, c_in = [], config.num_channels
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        # a fixed 2x2 grid whatever the input size, so the dense layer sees where features are
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(config.dropout),
                                      nn.Linear(4 * c_in, config.hidden_size), nn.ReLU())
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        feats = self.features(_channels(self.config, pixel_values))  # also bigml's FID feature space
        logits = self.classifier(self.dropout(feats))
        return ImageClassifierOutput(loss=_head_loss(self.config, logits, labels), logits=logits,
                                     hidden_states=(feats,) if output_hidden_states else None)


@dataclass
class TabularOutput(ModelOutput):
    loss: torch.FloatTensor = None
    logits: torch.FloatTensor = None


class BigmlTabularModel(_ClassicModel):
    """Raw numeric features in (columns in config.feature_names order), logits out: class scores,
    or the predicted number (regression, in the target's units)."""

    config_class = BigmlTabularConfig
    main_input_name = "features"

    def __init__(self, config):
        super().__init__(config)
        n = config.num_features
        # the training split's standardization, part of the weights (from_pretrained loads them)
        mean = config.feature_mean if config.feature_mean is not None else [0.0] * n
        std = config.feature_std if config.feature_std is not None else [1.0] * n
        self.register_buffer("feature_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("feature_std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("target_mean", torch.tensor([config.target_mean], dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor([config.target_std], dtype=torch.float32))
        self.body = _dense([n, *config.hidden_sizes], config.dropout)
        self.head = nn.Linear(([n, *config.hidden_sizes])[-1], config.num_labels)
        self.post_init()

    def forward(self, features, labels=None, return_dict=None, **kwargs):
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        logits = self.head(self.body(x))
        if self.config.problem_type == REGRESSION_PROBLEM:
            logits = logits * self.target_std + self.target_mean
        return TabularOutput(loss=_head_loss(self.config, logits, labels), logits=logits)


class BigmlRNNForCausalLM(_ClassicModel, GenerationMixin):
    """An LSTM / GRU language model. In `generate` the recurrent state plays the part of the KV cache
    (O(1) work per new token): transformers 5 passes it as `cache`."""

    config_class = BigmlRNNConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.embedding_size)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.rnn = rnn(config.embedding_size, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                       dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # a DynamicCache is made of attention layers; the recurrent state is this model's cache
        return False

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        if cache is not None:  # the state already covers every token but the newest
            return {"input_ids": input_ids[:, -1:], "cache": cache}
        return {"input_ids": input_ids, "cache": None, "attention_mask": attention_mask}

    def _run(self, input_ids, state, attention_mask):
        if attention_mask is None or state is not None or bool(attention_mask.all()):
            return self.rnn(self.embed(input_ids), state)
        # left-padded prompts of different lengths: run each row over its own tokens so that padding
        # never enters the state (outputs at padded positions are zeros)
        outputs, states = [], []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            keep = row[mask.bool()].unsqueeze(0)
            out, st = self.rnn(self.embed(keep), None)
            outputs.append(F.pad(out, (0, 0, row.shape[0] - keep.shape[1], 0)))
            states.append(st)
        if isinstance(states[0], tuple):
            state = tuple(torch.cat([s[i] for s in states], dim=1) for i in range(2))
        else:
            state = torch.cat(states, dim=1)
        return torch.cat(outputs, 0), state

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=None, return_dict=None,
                **kwargs):
        hidden, state = self._run(input_ids, cache, attention_mask)
        logits = self.lm_head(self.drop(hidden))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=state)


@dataclass
class GeneratorOutput(ModelOutput):
    images: torch.FloatTensor = None


class BigmlDCGANGenerator(_ClassicModel):
    """noise (N, latent_dim) -> images (N, C, H, W) in [-1, 1]. `num_images` and a torch.Generator
    draw the noise when none is given."""

    config_class = BigmlDCGANConfig
    main_input_name = "noise"

    def __init__(self, config):
        super().__init__(config)
        c = config.base_channels
        h, w = config.image_size[0] // 4, config.image_size[1] // 4
        self.project = nn.Sequential(nn.Linear(config.latent_dim, 2 * c * h * w), nn.BatchNorm1d(2 * c * h * w),
                                     nn.ReLU())
        self.net = nn.Sequential(
            nn.Unflatten(1, (2 * c, h, w)),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.ConvTranspose2d(c, config.num_channels, 4, 2, 1), nn.Tanh())
        self.post_init()

    def _init_weights(self, module):
        # DCGAN's initialization: N(0, 0.02) convolutions, N(1, 0.02) batch-norm gains
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, noise=None, num_images=None, generator=None, return_dict=None, **kwargs):
        if noise is None:
            noise = torch.randn(int(num_images), self.config.latent_dim, generator=generator,
                                device=self.project[0].weight.device)
        return GeneratorOutput(images=self.net(self.project(noise)))


class BigmlDCGANDiscriminator(nn.Module):
    """images (N, C, H, W) in [-1, 1] -> one real/fake logit each (trained beside the generator;
    kept in the checkpoints, not exported)."""

    def __init__(self, config):
        super().__init__()
        c = config.base_channels
        h, w = config.image_size[0] // 4, config.image_size[1] // 4
        self.net = nn.Sequential(
            nn.Conv2d(config.num_channels, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * c * h * w, 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        return self.net(images).reshape(-1)
