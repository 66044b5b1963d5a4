"""bigml generate through the CLI on tiny models: every decoding mode, inputs, outputs, bad input.

Three models are made once for the module: a character-level GPT pretrained by bigml (the seeds'
text generator, also the main causal model: one token per character makes text and token
comparisons the same thing), a tiny BERT pretrained by bigml (fill-mask), and a random Llama saved
with plain `save_pretrained` plus a chat template (a model bigml did not write).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import TINY_BERT, TINY_GPT, TINY_RUN

TEXT = "The cat sees the red stone. "
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus, cache_dir):
    """{'char': gpt dir, 'bert': bert dir, 'llama': llama dir}, made once."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("gen-models")
    env = {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CI": "1"}
    run = [*TINY_RUN, "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.limit_val_batches=1",
           f"data.path={corpus}"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["pretrain", *TINY_GPT, *run, "tokenizer=char", "tokenizer.vocab_size=64", "trainer.max_steps=30",
                     f"hydra.run.dir={root / 'char'}"]) == 0
        assert main(["pretrain", *TINY_BERT, *run, f"hydra.run.dir={root / 'bert'}"]) == 0

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(root / "char" / "model")
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llama = root / "llama"
    LlamaForCausalLM(cfg).save_pretrained(llama)
    tok.save_pretrained(llama)
    return {"char": root / "char" / "model", "bert": root / "bert" / "model", "llama": llama}


def gen(cli, model: Path, *args):
    return cli("generate", f"model.path={model}", *args)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- greedy, the KV cache, precision ---------------------------------------------------------

def test_greedy_prints_only_the_completion_and_is_deterministic(cli, models, env):
    a = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=12")
    b = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=12")
    assert a.code == 0, a.err
    assert a.out == b.out and a.out.endswith("\n") and TEXT not in a.out
    assert "tokens/s" in a.err and "first token after" in a.err  # the summary, on stderr
    assert not (Path(env["BIGML_OUTPUT_ROOT"]) / "generate").exists()  # no run directory left behind


@pytest.mark.parametrize("model, precision", [("char", "auto"), ("char", "bf16"), ("llama", "fp32"), ("llama", "bf16")])
def test_greedy_is_token_identical_with_and_without_the_kv_cache(cli, models, tmp_path, model, precision):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\nA dog moves slowly under the\nOne bird\n")  # different lengths: left padding
    outs = {}
    for cache in ("true", "false"):
        r = gen(cli, models[model], f"prompts_file={prompts}", f"output={tmp_path / cache}.jsonl",
                "max_new_tokens=24", f"use_cache={cache}", f"precision={precision}")
        assert r.code == 0, r.err
        outs[cache] = jsonl(tmp_path / f"{cache}.jsonl")
    assert [o["completion"] for o in outs["true"]] == [o["completion"] for o in outs["false"]]
    assert [o["new_tokens"] for o in outs["true"]] == [o["new_tokens"] for o in outs["false"]]


def test_cached_and_uncached_token_ids_match_directly(models):
    """The same check on token ids, through the Generator API, static cache included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigml.generation import Generator

    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(models["llama"])
    ids = {}
    for name, extra in {"dynamic": {}, "none": {"use_cache": False}, "static": {"cache_implementation": "static"}}.items():
        g = Generator(model, tok, {"max_new_tokens": 20, "do_sample": False, **extra}, stops=[])
        inputs, _ = g.encode(["The cat", "A dog moves"])
        with torch.inference_mode():
            ids[name] = model.generate(**inputs, generation_config=g.config).tolist()
    assert ids["dynamic"] == ids["none"] == ids["static"]


# --- sampling, beams, stop strings, several sequences -----------------------------------------

def test_sampling_is_reproducible_with_a_seed(cli, models, tmp_path):
    args = [f"prompt={TEXT}", "max_new_tokens=24", "do_sample=true", "temperature=1.5", "top_k=20", "top_p=0.95",
            "repetition_penalty=1.2"]
    a, b = gen(cli, models["char"], *args, "seed=1"), gen(cli, models["char"], *args, "seed=1")
    c = gen(cli, models["char"], *args, "seed=2")
    assert a.code == b.code == c.code == 0, a.err
    assert a.out == b.out and a.out != c.out


def test_num_return_sequences_and_beam_search(cli, models, tmp_path):
    r = gen(cli, models["char"], "prompt=The cat", "max_new_tokens=8", "do_sample=true", "num_return_sequences=3")
    rows = [json.loads(line) for line in r.out.splitlines()]  # several sequences: JSONL on stdout
    assert r.code == 0 and [row["sequence"] for row in rows] == [0, 1, 2]
    assert all(row["prompt"] == "The cat" for row in rows)
    r = gen(cli, models["char"], "prompt=The cat", "max_new_tokens=8", "num_beams=3", "num_return_sequences=2",
            "length_penalty=1.5", f"output={tmp_path / 'beams.jsonl'}")
    assert r.code == 0, r.err
    assert r.out == "" and len(jsonl(tmp_path / "beams.jsonl")) == 2
    assert "n/a (beam search)" in r.err


def test_stop_string_cuts_the_completion(cli, models, tmp_path):
    sample = ["do_sample=true", "seed=3"]  # the tiny model's greedy text may be all spaces; a sample is not
    full = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=20", *sample).out.rstrip("\n")
    stop = next((c for c in full[1:] if c.strip()), None)
    if stop is None:
        pytest.skip(f"the tiny model produced no visible character: {full!r}")
    cut = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=20", *sample, f"stop={stop}")
    assert cut.code == 0, cut.err
    assert cut.out == full[: full.index(stop)] + "\n"
    # escapes and lists of stop strings
    r = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=20", *sample, 'stop=["\\n", "' + stop + '"]')
    assert r.code == 0 and r.out == cut.out
    r = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=20", *sample, "stop=\\n", "stream=true")
    assert r.code == 0 and "\n" not in r.out.rstrip("\n")
    # a stop string no token contains (transformers refuses it) is still honoured, after decoding
    r = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=20", *sample, "stop=\u2603")
    assert r.code == 0 and r.out == full + "\n"


def test_streaming_prints_the_same_text(cli, models):
    plain = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=16")
    streamed = gen(cli, models["char"], f"prompt={TEXT}", "max_new_tokens=16", "stream=true")
    assert streamed.code == 0 and streamed.out == plain.out


# --- inputs and outputs ----------------------------------------------------------------------

def test_prompts_file_text_and_jsonl_to_jsonl(cli, models, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("The cat\n\nA dog\nOne bird\n")  # the empty line is skipped
    r = gen(cli, models["char"], f"prompts_file={txt}", f"output={tmp_path / 'o.jsonl'}", "max_new_tokens=6", "batch_size=2")
    assert r.code == 0, r.err
    rows = jsonl(tmp_path / "o.jsonl")
    assert [row["prompt"] for row in rows] == ["The cat", "A dog", "One bird"]
    assert all({"completion", "new_tokens", "seconds"} <= set(row) for row in rows)
    assert all(1 <= row["new_tokens"] <= 6 for row in rows)
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": 7, "text": "The cat"}\n{"id": 8, "text": "A dog"}\n')
    r = gen(cli, models["char"], f"prompts_file={src}", "prompt_field=text", "max_new_tokens=4")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]  # no output=: JSONL on stdout
    assert [(row["id"], row["text"]) for row in rows] == [(7, "The cat"), (8, "A dog")]


@pytest.mark.parametrize("prompt", ["The capital of France is [MASK].", "a,b=c: 'quoted' \"double\" {x} ${y} \\ end",
                                    "key=value, [1, 2]: #%@!&*()?<>|~`", "it's"])
def test_awkward_prompts_arrive_unchanged(cli, models, tmp_path, prompt):
    r = gen(cli, models["char"], f"prompt={prompt}", "max_new_tokens=2", f"output={tmp_path / 'o.jsonl'}")
    assert r.code == 0, r.err
    assert jsonl(tmp_path / "o.jsonl")[0]["prompt"] == prompt


def test_quote_free_text_round_trips_through_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from bigml.cli import quote_free_text

    parser = OverridesParser.create()
    for text in ["x", "", " a b ", "[MASK]", "a,b", "it's", "\\", "\\'", "${oc.env:HOME}", "\\${a}", "a\nb", "'q'", '"d"']:
        override = quote_free_text("generate", [f"prompt={text}"])[0]
        assert OmegaConf.create({"p": parser.parse_override(override).value()}).p == text, override
    assert quote_free_text("pretrain", ["prompt=[a]"]) == ["prompt=[a]"]  # other commands: untouched
    assert quote_free_text("generate", ["prompt=null", "model.path=a=b"]) == ["prompt=null", "model.path=a=b"]


def test_stdin_prompt_and_stdout_holds_only_text(run_script, models, cli, tmp_path):
    expected = gen(cli, models["char"], f"prompt={TEXT.strip()}", "max_new_tokens=10").out
    r = run_script("generate", f"model.path={models['char']}", "max_new_tokens=10", stdin=TEXT.strip() + "\n", cwd=tmp_path)
    assert r.code == 0, r.err
    assert r.out == expected  # `> out.txt` would hold exactly the completion
    assert "tokens/s" in r.err and "loading" in r.err
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory


def test_chat_template_on_a_model_saved_with_save_pretrained(cli, models, tmp_path):
    r = gen(cli, models["llama"], "prompt=hello", "chat=true", "max_new_tokens=5", f"output={tmp_path / 'o.jsonl'}")
    assert r.code == 0, r.err
    assert jsonl(tmp_path / "o.jsonl")[0]["prompt"] == "hello"
    r = gen(cli, models["char"], "prompt=hello", "chat=true", "max_new_tokens=5")
    assert r.code == 2 and "no chat template" in r.err


# --- the character-level generator -------------------------------------------------------------

def test_char_level_generator_continues_character_by_character(cli, models, corpus, tmp_path):
    r = gen(cli, models["char"], "prompt=The cat sees", "max_new_tokens=30", f"output={tmp_path / 'o.jsonl'}",
            "precision=fp32")
    assert r.code == 0, r.err
    row = jsonl(tmp_path / "o.jsonl")[0]
    alphabet = set("".join(p.read_text() for p in corpus.iterdir()))
    assert set(row["completion"]) <= alphabet
    assert len(row["completion"]) in (row["new_tokens"], row["new_tokens"] - 1)  # one character a token (+ an end token)
    tok = json.loads((models["char"] / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "WordLevel"


# --- masked LMs ----------------------------------------------------------------------------

def test_fill_mask_prints_top_k_with_probabilities(cli, models, tmp_path):
    r = gen(cli, models["bert"], "prompt=The cat [MASK] the red stone.", "top_k=3")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 3
    scores = [float(line.split("\t")[0]) for line in lines]
    assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
    from transformers import AutoTokenizer

    mask = AutoTokenizer.from_pretrained(models["bert"]).mask_token
    f = tmp_path / "m.txt"
    f.write_text(f"A dog {mask} slowly.\nThe [MASK] [MASK] far.\n")
    r = gen(cli, models["bert"], f"prompts_file={f}", f"output={tmp_path / 'o.jsonl'}")
    assert r.code == 0, r.err
    one, two = jsonl(tmp_path / "o.jsonl")
    assert len(one["fills"]) == 5 and {"token", "score"} <= set(one["fills"][0])
    assert len(two["fills"]) == 2 and len(two["fills"][0]) == 5  # one list per mask
    r = gen(cli, models["bert"], "prompt=No mask here.")
    assert r.code == 2 and "no mask" in r.err


# --- bad input: one line, exit 2 ------------------------------------------------------------

def test_prompt_longer_than_the_context(cli, models, tmp_path):
    long = "The cat sees the red stone. " * 4  # 112 characters; the context is 64
    r = gen(cli, models["char"], f"prompt={long}", "max_new_tokens=8", f"output={tmp_path / 'o.jsonl'}")
    assert r.code == 0, r.err
    assert "1 of 1 prompts were longer" in r.err and "56 tokens the context leaves" in r.err
    assert jsonl(tmp_path / "o.jsonl")[0]["truncated_tokens"] == len(long) - 56
    r = gen(cli, models["char"], f"prompt={long}", "max_new_tokens=8", "prompt_overflow=error")
    assert r.code == 2 and "prompt 1 has 112 tokens" in r.err


@pytest.fixture(scope="module")
def bad_dirs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "resnet").mkdir()
    (root / "resnet" / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    (root / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(models["char"] / f, root / "notok" / f)
    (root / "prompts.txt").write_text("")
    return root


@pytest.mark.parametrize("args, needle", [
    (["prompt="], "prompt is empty"),
    (["prompt=   "], "prompt is empty"),
    (["prompt=hi", "max_new_tokens=0"], "max_new_tokens: 0 must be at least 1"),
    (["prompt=hi", "max_new_tokens=-3"], "max_new_tokens: -3 must be at least 1"),
    (["prompt=hi", "max_new_tokens=64"], "leaves no room for a prompt"),
    (["prompts_file=/nonexistent/prompts.txt"], "prompts_file=/nonexistent/prompts.txt: no such file"),
    (["prompts_file={bad}/prompts.txt"], "no prompts in it"),
    (["prompt=hi", "prompts_file=x.txt"], "not both"),
    (["prompt=hi", "num_return_sequences=2"], "greedy sequences would all be the same"),
    (["prompt=hi", "precision=fp8"], "unknown precision"),
    (["model.path={bad}/resnet", "prompt=hi"], "neither a masked nor a causal language model"),
    (["model.path={bad}/notok", "prompt=hi"], "holds no tokenizer files"),
    (["model.path=/nonexistent/model", "prompt=hi"], "no such directory"),
    (["prompt=hi", "max_new_tokens=abc"], "max_new_tokens"),
    (["prompt=hi", "threads=0"], "threads: 0 is not auto or a number of threads"),
    (["prompt=hi", "threads=many"], "threads: 'many' is not auto or a number of threads"),
    (["prompt=hi", "compile=sometimes"], "compile: 'sometimes' is not auto, true or false"),
    (["prompt=hi", "quantize=int3"], "quantize: 'int3' is not one of none, int8, int4"),
])
def test_bad_input_is_one_line_and_exit_2(cli, models, bad_dirs, env, args, needle):
    args = [a.replace("{bad}", str(bad_dirs)) for a in args]
    if not any(a.startswith("model.path=") for a in args):
        args = [f"model.path={models['char']}", *args]
    r = cli("generate", *args)
    assert r.code == 2, (r.code, r.err)
    assert needle in r.err
    assert r.err.strip().count("\n") <= 1 and "Traceback" not in r.err, r.err
    assert not (Path(env["BIGML_OUTPUT_ROOT"]) / "generate").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin, needle", [(io.StringIO(""), "piped on standard input is empty"),
                                           (_Terminal(""), "no prompt: give prompt=")])
def test_no_prompt_at_all_is_a_usage_error(cli, models, monkeypatch, stdin, needle):
    monkeypatch.setattr(sys, "stdin", stdin)
    r = gen(cli, models["char"])
    assert r.code == 2 and needle in r.err


# --- speed: decided by measurement, recorded; options; compile cache ---------------------------

def speed_run(model: Path, *args, prompt: str | None = "The cat", new: int = 8) -> dict:
    import bigml

    first = [f"prompt={prompt}"] if prompt is not None else []
    return bigml.run("generate", [f"model.path={model}", *first, f"max_new_tokens={new}", "stream=false", *args])


@pytest.fixture()
def keep_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_speed_defaults_are_measured_and_recorded(cli, models, env, keep_threads):
    import os

    import torch

    r = gen(cli, models["llama"], "prompt=The cat", "max_new_tokens=8")
    assert r.code == 0, r.err
    line = next(x for x in r.err.splitlines() if x.startswith("speed: "))
    assert "precision" in line and "threads" in line and "compile off" in line and "MB read per decoding step" in line
    m = speed_run(models["llama"])
    assert m["precision"] in ("bfloat16", "float32") and m["quantize"] == "none" and m["compile"] is False
    cores = len(os.sched_getaffinity(0))
    assert m["threads"] in (1, cores) and torch.get_num_threads() == m["threads"]
    d = m["decisions"]
    assert "measured" in d["threads"] and f"{m['threads']}: " in d["threads"]
    # the precision race is kept per CPU and model shape: the second call reuses it (same text)
    assert d["precision"].endswith("measured earlier on this CPU)"), d["precision"]
    assert d["precision"].startswith("bf16" if m["precision"] == "bfloat16" else "fp32")
    known = json.loads((Path(env["BIGML_CACHE_DIR"]) / "decode_precision.json").read_text())
    ratio = float(d["precision"].split("bf16 at ")[1].split("x")[0])
    assert any(abs(v - ratio) < 0.01 for v in known.values())
    assert (m["precision"] == "bfloat16") == (ratio > 1.1)


def test_explicit_speed_keys_are_obeyed(models, keep_threads):
    import torch

    m = speed_run(models["llama"], "threads=1", "precision=fp32", "compile=false")
    assert (m["threads"], m["precision"], m["compile"]) == (1, "float32", False)
    assert m["decisions"]["threads"] == "1 (threads=1)" and m["decisions"]["compile"] == "off (compile=false)"
    assert torch.get_num_threads() == 1


def test_weight_bytes_counts_what_a_step_reads(models):
    """fp32 -> 4 bytes a weight; int8 -> 1 byte plus one scale per row; the input embeddings (one row a
    token) count only while tied to the output layer. Checked against the parameter shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigml.decode_speed import quantize_weights, weight_bytes

    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    mats = sum(m.weight.numel() for m in linear)  # the output layer included; untied input embeddings not
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert weight_bytes(model) == 4 * (mats + norms)
    model = model.to(torch.bfloat16)
    quantize_weights(model, "int8", "cpu")
    rows = sum(m.out_features for m in linear)
    scale_bytes = weight_bytes(model) - sum(m.in_features * m.out_features for m in linear) - 2 * norms
    assert scale_bytes in (2 * rows, 4 * rows)  # one bf16 / fp32 scale per output row


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_decode_close_to_the_reference(cli, models, tmp_path, quantize, keep_threads):
    """int8 / int4 weight-only (torchao) through the CLI; the quantized model's next-token
    distribution stays close to the bf16 one (independent forward passes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigml.decode_speed import quantize_weights

    r = gen(cli, models["llama"], "prompt=The cat", "max_new_tokens=6", f"quantize={quantize}", "compile=false",
            f"output={tmp_path / 'o.jsonl'}")
    assert r.code == 0, r.err
    assert f"{quantize} weight-only" in r.err and "precision bf16 (activations of quantized weights)" in r.err
    assert jsonl(tmp_path / "o.jsonl")[0]["new_tokens"] >= 1
    ref = AutoModelForCausalLM.from_pretrained(models["llama"]).eval().to(torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(models["llama"]).eval().to(torch.bfloat16)
    quantize_weights(q, quantize, "cpu")
    ids = torch.randint(3, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        p, pq = (m(input_ids=ids).logits.float().softmax(-1) for m in (ref, q))
    assert (p - pq).abs().sum(-1).max() < (0.1 if quantize == "int8" else 0.5)  # total variation, per position


def test_int4_group_size_divides_every_layer():
    from torch import nn

    from bigml.decode_speed import int4_group_size

    assert int4_group_size(nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))) == 64  # SmolLM2's widths
    assert int4_group_size(nn.Sequential(nn.Linear(256, 768), nn.Linear(768, 256))) == 128
    assert int4_group_size(nn.Linear(48, 8)) is None


def test_compile_is_greedy_identical_and_cached(cli, models, env, tmp_path, keep_threads):
    """compile=true (static cache, Inductor) decodes the same greedy tokens as eager, and its
    artifacts land in cache_dir/inductor (what makes the next compile of the setup cheap);
    compile=auto leaves bf16 / fp32 eager and compiles int8 weights."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\nA dog moves slowly under the\nOne bird\n")
    outs = {}
    for name, extra in {"eager": ["compile=false"], "compiled": ["compile=true"]}.items():
        r = gen(cli, models["llama"], f"prompts_file={prompts}", f"output={tmp_path / name}.jsonl", "max_new_tokens=12",
                "precision=fp32", "threads=1", *extra)
        assert r.code == 0, r.err
        outs[name] = [row["completion"] for row in jsonl(tmp_path / f"{name}.jsonl")]
    assert outs["eager"] == outs["compiled"]
    assert "static KV cache, compiled" in r.err
    inductor = Path(env["BIGML_CACHE_DIR"]) / "inductor"
    assert any((inductor / "fxgraph").rglob("*")) or any((inductor / "aotautograd").rglob("*"))
    auto = speed_run(models["llama"], "precision=fp32", "threads=1")
    assert auto["compile"] is False and "compile=auto" in auto["decisions"]["compile"]
    from bigml.decode_speed import decide_compile

    assert decide_compile("auto", "int8")[0] is True and decide_compile("auto", "int4")[0] is False


def test_static_cache_length_is_bucketed(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigml.generation import Generator

    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()  # context 256
    g = Generator(model, AutoTokenizer.from_pretrained(models["llama"]), {"max_new_tokens": 20}, stops=[])
    assert [g.static_cache_length(n) for n in (1, 100, 236, 237)] == [256, 256, 256, 256]
    g.STATIC_CACHE_STEP = 64
    assert [g.static_cache_length(n) for n in (1, 44, 45, 200)] == [64, 64, 128, 256]
