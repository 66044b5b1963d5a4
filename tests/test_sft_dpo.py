"""Instruction tuning (task=sft) and preference tuning (task=dpo) of causal LMs, end to end through
the CLI on tiny models, plus the unit-sized checks: answer-only loss masks, packing without
attention across examples, and the DPO loss against TRL's on a fixed batch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import TINY_GPT

COLORS = ["red", "green", "blue", "black", "white"]
ANIMALS = ["cat", "dog", "bird", "fish"]


def qa_rows(n: int, seed: int) -> list[dict]:
    """Yes/no questions a tiny model answers after a few epochs (the base model cannot)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(COLORS + ANIMALS)
        rows.append({"prompt": f"Is {word} a color?", "completion": "yes" if word in COLORS else "no"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory) -> Path:
    """A tiny GPT pretrained (briefly) on text that uses the chat data's words."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("sft-base")
    corpus = root / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text(" ".join(f"Is {rng.choice(COLORS + ANIMALS)} a color? yes no. ### User: ### Assistant:"
                               for _ in range(600)))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BIGML_OUTPUT_ROOT": str(root), "BIGML_CACHE_DIR": str(root / "cache"), "CI": "1",
                     "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
            mp.setenv(k, v)
        assert main(["pretrain", *TINY_GPT, "model.hidden_size=64", "model.max_position_embeddings=128",
                     "tokenizer.vocab_size=300", "data=text", f"data.path={corpus}", "data.block_size=64",
                     "data.batch_size=8", "trainer.max_steps=20", "trainer.val_check_interval=20", "logger=none",
                     "trainer.precision=32-true", f"hydra.run.dir={root / 'run'}"]) == 0
    return root / "run" / "model"


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {"train": write_jsonl(root / "train.jsonl", qa_rows(160, 1)),
            "test": write_jsonl(root / "test.jsonl", qa_rows(40, 2))}


SFT = ["task=sft", "trainer.max_epochs=12", "optimizer.lr=5e-3", "data.batch_size=16", "data.max_length=48",
       "logger=none", "trainer.precision=32-true", "eval.generate=true", "eval.max_new_tokens=4"]


def test_sft_full_end_to_end(cli, base_lm, chat_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "sft"
    before = (base_lm / "model.safetensors").read_bytes()
    r = cli("finetune", *SFT, f"model.path={base_lm}", f"data.path={chat_files['train']}",
            f"data.test_path={chat_files['test']}", f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    m = json.loads((run / "metrics.json").read_text())
    for k in ("val_loss", "val_perplexity", "test_loss", "test_perplexity", "test_exact_match", "test_contains",
              "test_chrf", "test_rouge_l", "trained_tokens_per_sec"):
        assert k in m, k
    assert m["status"] == "completed" and m["task"] == "sft"
    assert m["test_exact_match"] >= 0.8, m  # yes/no learned
    assert abs(m["test_perplexity"] - torch.tensor(m["test_loss"]).exp().item()) < 1e-3 * m["test_perplexity"]
    assert (base_lm / "model.safetensors").read_bytes() == before

    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"prompt", "reference", "generated"}
    exact = sum(r["generated"].strip() == r["reference"] for r in rows) / len(rows)
    assert exact == pytest.approx(m["test_exact_match"])

    # a plain transformers causal LM with its chat template; greedy answers as bigml's
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok.chat_template and "### Assistant" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == rows[0]["generated"].strip()

    r = cli("generate", f"model.path={run / 'model'}", "chat=true", "prompt=Is red a color?", "max_new_tokens=4")
    assert r.code == 0 and r.out.strip() == "yes", (r.out, r.err)

    # bigml eval reads the task from bigml.json and scores the same rows the same way
    r = cli("eval", f"model.path={run / 'model'}", f"data.path={chat_files['test']}", "eval.generate=true",
            "eval.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'e'}", "eval.fail_below.exact_match=0.5")
    assert r.code == 0, r.err
    e = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert e["task"] == "sft" and e["loss"] == pytest.approx(m["test_loss"], abs=1e-5)
    assert e["exact_match"] == pytest.approx(m["test_exact_match"])
    assert e["gate"].startswith("passed")

    # the base model cannot answer: the tuned model's generative accuracy beats it
    r = cli("eval", "task=sft", f"model.path={base_lm}", f"data.path={chat_files['test']}", "eval.generate=true",
            "eval.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["exact_match"] < m["test_exact_match"]


def test_sft_lora_and_packing(cli, base_lm, chat_files, tmp_path):
    run = tmp_path / "lora"
    r = cli("finetune", *SFT, "method=lora", "method.rank=8", "optimizer.lr=2e-2", "sft.packing=true",
            "method.target_modules=[c_attn,c_proj,c_fc]", f"model.path={base_lm}", f"data.path={chat_files['train']}",
            f"data.test_path={chat_files['test']}", f"hydra.run.dir={run}", "eval.generate=false")
    assert r.code == 0, r.err
    m = json.loads((run / "metrics.json").read_text())
    assert m["trainable_share"] < 0.2 and (run / "adapter" / "adapter_config.json").exists()
    assert "sft.packing:" in r.err and json.loads((run / "model" / "bigml.json").read_text())["packing"] is True
    # learned: the merged model scores the answers better than the base model did
    r = cli("eval", "task=sft", f"model.path={base_lm}", f"data.path={chat_files['test']}", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.code == 0, r.err
    assert m["test_loss"] < json.loads((tmp_path / "b" / "metrics.json").read_text())["loss"] - 0.5


def test_answer_only_loss_mask_and_eos(base_lm):
    from transformers import AutoTokenizer

    from bigml.data import chat

    tok = AutoTokenizer.from_pretrained(base_lm)
    tok.chat_template = chat.DEFAULT_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is red a color?"},
            {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Is cat a color?"},
            {"role": "assistant", "content": "no"}]
    ids, labels, cut = chat.encode_conversation(tok, msgs, 256, False, "t")
    assert not cut and len(ids) == len(labels)
    trained = tok.decode([t for t, y in zip(ids, labels, strict=True) if y != -100])
    assert trained.replace(tok.eos_token, "|") == "yes|no|"  # both answers and their EOS, nothing else
    _, all_labels, _ = chat.encode_conversation(tok, msgs, 256, True, "t")
    assert all(y != -100 for y in all_labels)
    with pytest.raises(chat.SkipRow):
        chat.encode_conversation(tok, msgs[:2], 256, False, "t")  # no assistant turn
    with pytest.raises(chat.SkipRow):
        chat.encode_conversation(tok, msgs, 12, False, "t")  # the answers are cut off


def test_packed_rows_do_not_attend_across_examples(base_lm):
    from transformers import AutoModelForCausalLM

    from bigml.tasks.sft import pack, packed_collate

    model = AutoModelForCausalLM.from_pretrained(base_lm).eval()
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 5, 9, 3)]
    blocks = pack([len(r["input_ids"]) for r in rows], 16, seed=0)
    assert sorted(i for b in blocks for i in b) == [0, 1, 2, 3] and all(
        sum(len(rows[i]["input_ids"]) for i in b) <= 16 for b in blocks)
    batch = packed_collate(rows, pad_id=0)(blocks)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for k, block in enumerate(blocks):
            start = 0
            for i in block:
                n = len(rows[i]["input_ids"])
                alone = model(input_ids=torch.tensor([rows[i]["input_ids"]]), use_cache=False).logits
                assert torch.allclose(packed[k, start:start + n], alone[0], atol=1e-4)
                assert batch["labels"][k, start] == -100  # nothing predicts a conversation's first token
                start += n


@pytest.mark.parametrize("args, needle", [
    (["sft.template={{ messages[0].missing.x }}"], "chat template does not render"),
    (["data.prompt_column=question"], "no conversation columns"),
    ([], "no conversation has an answer"),
])
def test_sft_bad_input_is_one_line_and_exit_2(cli, base_lm, tmp_path, args, needle):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Is red a color?", "completion": ""}] * 20) if not args \
        else write_jsonl(tmp_path / "d.jsonl", qa_rows(20, 3))
    r = cli("finetune", *SFT, f"model.path={base_lm}", f"data.path={data}", f"hydra.run.dir={tmp_path / 'r'}", *args)
    assert r.code == 2, r.err
    assert needle in r.err and "Traceback" not in r.err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_sft_needs_a_base_model(cli, chat_files, tmp_path):
    r = cli("finetune", "task=sft", "model=gpt-tiny", f"data.path={chat_files['train']}", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 2 and "model.path" in r.err


def test_skipped_conversations_are_counted(cli, base_lm, tmp_path):
    rows = qa_rows(60, 4) + [{"prompt": "Is red a color?", "completion": ""}] * 5
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = cli("finetune", *SFT, "dry_run=true", f"model.path={base_lm}", f"data.path={data}",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert r.code == 0, r.err
    assert "conversations skipped" in r.err and "empty answer" in r.err


# -- DPO -------------------------------------------------------------------------------------------

def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(COLORS)
        rows.append({"prompt": f"Is {word} a color?", "chosen": " yes, it is.", "rejected": " I do not know."})
    return rows


def test_dpo_raises_reward_accuracy_and_eval_recomputes_the_reference(cli, base_lm, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(120, 5))
    run = tmp_path / "dpo"
    r = cli("finetune", "task=dpo", f"model.path={base_lm}", f"data.path={data}", "trainer.max_epochs=2",
            "optimizer.lr=3e-3", "data.batch_size=16", "logger=none", "trainer.precision=32-true",
            f"hydra.run.dir={run}")
    assert r.code == 0, r.err
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_reward_accuracy"] > 0.5 and m["test_reward_margin"] > 0, m
    assert m["test_logps_chosen"] > m["test_logps_rejected"]
    meta = json.loads((run / "model" / "bigml.json").read_text())
    assert meta["task"] == "dpo" and meta["reference_model"] == str(base_lm)
    r = cli("eval", "task=dpo", f"model.path={run / 'model'}", f"data.path={data}", "eval.split=test",
            f"hydra.run.dir={tmp_path / 'e'}")
    assert r.code == 0, r.err
    e = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert e["reward_accuracy"] == pytest.approx(m["test_reward_accuracy"]) and \
        e["loss"] == pytest.approx(m["test_loss"], abs=1e-5)


def test_dpo_loss_matches_trl_on_a_fixed_batch(base_lm):
    """bigml's tokenization, log-probs and losses against TRL's DPOTrainer (sigmoid and IPO)."""
    trl = pytest.importorskip("trl")
    import copy
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigml.data import chat
    from bigml.tasks.dpo import answer_logps, dpo_loss, pair_batch

    tok = AutoTokenizer.from_pretrained(base_lm)
    ref = AutoModelForCausalLM.from_pretrained(base_lm).eval()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    examples = [("Is red a color?", " yes, it is.", " no."), ("Is cat a color? ", "no, it is an animal.", " yes."),
                ("Is blue a color?", " yes", " I do not know" + tok.eos_token)]
    rows = []
    for p, c, r in examples:
        p_ids, c_ids, r_ids = chat.encode_preference(tok, p, c, r)
        rows.append({"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids})
    batch = pair_batch(rows, tok.pad_token_id)
    with torch.no_grad():
        pi, n = answer_logps(policy, batch)
        ref_lp, _ = answer_logps(ref, batch)
    for loss_type in ("sigmoid", "ipo"):
        ours = dpo_loss(pi, ref_lp, n, 0.1, loss_type)[0].mean().item()
        args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, loss_type=[loss_type], per_device_train_batch_size=3,
                             use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], max_length=None)
        ds = Dataset.from_dict({k: [e[i] for e in examples] for i, k in enumerate(("prompt", "chosen", "rejected"))})
        trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=ds,
                                 processing_class=tok)
        trl_rows = [trainer.train_dataset[i] for i in range(3)]
        for mine, theirs in zip(rows, trl_rows, strict=True):  # the same tokens
            assert (mine["prompt_ids"], mine["chosen_ids"], mine["rejected_ids"]) == \
                (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows)).item()
        assert ours == pytest.approx(theirs, abs=1e-5), loss_type
