"""Hash dropout masks (bigml.models.fast_dropout, trainer.dropout_masks): the right keep rate,
independent elements, the same mask forward and backward, reproducible from the seed, attention that
equals transformers' SDPA, and the CLI choosing, recording and resuming them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bigml.models.fast_dropout import HashDropout, attention, hash_dropout, keep_mask, use_hash_dropout
from conftest import TINY_BERT, TINY_RUN


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_keep_one_minus_p_independently(p):
    n = 1_000_001  # odd: the last hash gives only one of its two halves
    mask = keep_mask((n,), p, seed=1234).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - (1 - p)) < 5 * sigma
    # neighbours (the two halves of one hash, and consecutive hashes) are uncorrelated
    for lag in (1, 2, 3):
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), lag
    other = keep_mask((n,), p, seed=1235).double()
    assert abs(torch.corrcoef(torch.stack([mask, other]))[0, 1].item()) < 5 / math.sqrt(n)
    assert torch.equal(keep_mask((n,), p, seed=1234), keep_mask((n,), p, seed=1234))


def test_the_backward_pass_uses_the_forward_mask_and_seeds_reproduce():
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(7)
    y = hash_dropout(x, 0.25)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert torch.equal(x.grad, kept.float() / 0.75)
    torch.manual_seed(7)
    assert torch.equal(hash_dropout(x, 0.25), y)  # the seed comes from torch's generator
    assert not torch.equal(hash_dropout(x, 0.25), y)  # ... and moves on with it
    layer = HashDropout(0.25).eval()
    assert layer(x) is x and hash_dropout(x, 0.0) is x


def _sdpa(module, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, *args, **kwargs)[0]


@pytest.mark.parametrize("case", ["bool mask", "float mask", "causal", "grouped kv heads"])
def test_attention_equals_sdpa_when_nothing_is_dropped(case):
    torch.manual_seed(0)
    module = torch.nn.Module().train()
    module.is_causal = case == "causal"
    kv_heads = 2 if case == "grouped kv heads" else 4
    q, k, v = torch.randn(3, 4, 9, 8), torch.randn(3, kv_heads, 9, 8), torch.randn(3, kv_heads, 9, 8)
    mask = None
    if case == "bool mask":
        mask = torch.ones(3, 1, 9, 9, dtype=torch.bool)
        mask[0, :, :, 5:] = False
    elif case == "float mask":
        mask = torch.zeros(3, 1, 9, 9)
        mask[1, :, :, 3:] = torch.finfo(torch.float32).min
    kwargs = {"scaling": 0.3}
    if case == "grouped kv heads":
        module.num_key_value_groups = 2
        kwargs["enable_gqa"] = True
    ref = _sdpa(module, q, k, v, mask, dropout=0.0, **kwargs)
    ours, _ = attention(module, q, k, v, mask, dropout=1e-9, **kwargs)  # the math path, nothing dropped
    assert torch.allclose(ours, ref, atol=1e-5)


def test_swapping_keeps_weights_and_eval_outputs_and_the_saved_config(tmp_path):
    from transformers import AutoConfig, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 100, (4, 12))
    am = torch.ones_like(ids)
    am[0, 7:] = 0
    before = model(input_ids=ids, attention_mask=am).logits
    keys = list(model.state_dict())
    # embeddings, 2 x (attention probs, attention output, feed-forward output), classifier
    assert use_hash_dropout(model) == 1 + 2 * 3 + 1
    assert use_hash_dropout(model) == 0  # idempotent
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, before)  # eval: no dropout, SDPA
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids, attention_mask=am).logits
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=ids, attention_mask=am).logits, a)
    assert not torch.allclose(a, before)
    model.save_pretrained(tmp_path)
    assert "bigml" not in (tmp_path / "config.json").read_text()  # the attention routing is not saved
    assert AutoConfig.from_pretrained(tmp_path)._attn_implementation != "bigml_sdpa"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_cli_chooses_records_and_resumes_hash_masks(cli, corpus, tmp_path):
    args = [*TINY_RUN, *TINY_BERT, f"data.path={corpus}", "trainer.precision=32-true"]
    r = cli("pretrain", *args, f"hydra.run.dir={tmp_path / 'hash'}")
    assert r.code == 0, r.err
    hashed = _metrics(tmp_path / "hash")
    assert hashed["decisions"]["dropout_masks"] == "hash (auto: on CPU torch draws dropout masks serially)"
    r = cli("pretrain", *args, "trainer.dropout_masks=torch", f"hydra.run.dir={tmp_path / 'torch'}")
    assert r.code == 0, r.err
    plain = _metrics(tmp_path / "torch")
    assert plain["decisions"]["dropout_masks"] == "torch (trainer.dropout_masks=torch)"
    # different masks, the same training: both learn, to about the same loss
    for m in (hashed, plain):
        assert m["val_loss"] < m["val_loss_initial"] - 0.1
    assert hashed["val_loss"] == pytest.approx(plain["val_loss"], abs=0.15)
    assert hashed["train_loss"] != plain["train_loss"]
    # resuming from the step-6 checkpoint continues the same masks: the same run, exactly
    r = cli("pretrain", *args, f"resume={tmp_path / 'hash' / 'checkpoints' / 'step-000006.ckpt'}",
            f"hydra.run.dir={tmp_path / 'resumed'}")
    assert r.code == 0, r.err
    resumed = _metrics(tmp_path / "resumed")
    assert resumed["train_loss"] == pytest.approx(hashed["train_loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(hashed["val_loss"], abs=1e-6)


def test_an_unknown_mask_kind_is_one_line(cli, corpus):
    r = cli("pretrain", *TINY_RUN, *TINY_BERT, f"data.path={corpus}", "trainer.dropout_masks=fast")
    assert r.code == 2
    assert "trainer.dropout_masks" in r.err and "auto, hash, torch" in r.err
