"""`bigml serve` as users run it: the console script in a subprocess, queried over a real socket
with the official `openai` client and plain `httpx`; every endpoint, streaming, stop strings,
bad requests, a client that disconnects mid-stream, concurrent requests batched, an API key,
and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import BIGML_SCRIPT, TINY_BERT, TINY_FT, TINY_GPT, TINY_RUN

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus, cache_dir, labeled_csv):
    """A character-level GPT (each character one token: stop strings are easy to aim), the same
    with a chat template, a BERT masked LM, a classifier and a token tagger."""
    from bigml.cli import main

    root = tmp_path_factory.mktemp("serve-models")
    env = {"BIGML_OUTPUT_ROOT": str(root / "runs"), "BIGML_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CI": "1"}
    run = [*TINY_RUN, "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=1",
           f"data.path={corpus}"]
    ft = [*TINY_FT, f"data.path={labeled_csv}", "trainer.max_epochs=3"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["pretrain", *TINY_GPT, *run, "tokenizer=char", "tokenizer.vocab_size=64",
                     f"hydra.run.dir={root / 'char'}"]) == 0
        assert main(["pretrain", *TINY_BERT, *run, "trainer.max_steps=8", f"hydra.run.dir={root / 'bert'}"]) == 0
        assert main(["finetune", *ft, f"hydra.run.dir={root / 'cls'}"]) == 0
        assert main(["finetune", *ft, "task=token", "data.label_column=ner", f"hydra.run.dir={root / 'token'}"]) == 0
    chat = root / "chat"
    shutil.copytree(root / "char" / "model", chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    (chat / "SHA256SUMS").unlink()  # edited on purpose: the checksums no longer apply (as the error says)
    return {"lm": root / "char" / "model", "chat": chat, "bert": root / "bert" / "model",
            "cls": root / "cls" / "model", "token": root / "token" / "model"}


class Server:
    """`bigml serve` in a subprocess on a port the OS picks (serve.port=0), read from its log."""

    def __init__(self, env: dict, model: Path, *args: str, extra_env: dict | None = None):
        self.proc = subprocess.Popen([BIGML_SCRIPT, "serve", f"model.path={model}", "serve.port=0", *args],
                                     env={**env, **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r" on (http://\S+?);", line)
                if m:
                    self.url = m.group(1)
                if "Application startup complete" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(120)
        assert self.url and self.proc.poll() is None, "".join(self.lines)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@contextlib.contextmanager
def serving(env, model, *args, extra_env=None):
    server = Server(env, model, *args, extra_env=extra_env)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def module_env(cache_dir, tmp_path_factory):
    import os

    return {**os.environ, "BIGML_CACHE_DIR": str(cache_dir), "CI": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "BIGML_OUTPUT_ROOT": str(tmp_path_factory.mktemp("serve-runs"))}


@pytest.fixture(scope="module")
def lm_server(models, module_env):
    """One server for the causal-LM tests (a chat template, so both OpenAI endpoints work); stopped
    with SIGTERM at the end, which must exit 0."""
    server = Server(module_env, models["chat"], "serve.batch_wait_ms=100", "serve.max_batch_size=8")
    yield server
    assert server.stop() == 0, server.log
    assert "stopped (SIGTERM)" in server.log


def openai_client(server, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path, body, **kw):
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


# -- causal LMs ------------------------------------------------------------------------------------

def test_completion_equals_bigml_generate_and_counts_usage(lm_server, models, cli):
    from transformers import AutoTokenizer

    r = cli("generate", f"model.path={models['chat']}", "prompt=The cat sees", "max_new_tokens=12")
    assert r.code == 0, r.err
    c = openai_client(lm_server).completions.create(model="x", prompt="The cat sees", max_tokens=12, temperature=0)
    assert c.choices[0].text == r.out.rstrip("\n")
    tok = AutoTokenizer.from_pretrained(models["chat"])
    prompt_tokens = len(tok("The cat sees")["input_ids"])
    assert c.usage.prompt_tokens == prompt_tokens
    assert c.usage.completion_tokens <= 12 and c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_and_usage(lm_server):
    client = openai_client(lm_server)
    full = client.completions.create(model="x", prompt="A dog finds", max_tokens=16)
    chunks = list(client.completions.create(model="x", prompt="A dog finds", max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1  # really streamed, piece by piece
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason


def test_chat_completions_stream_and_not(lm_server, models):
    from transformers import AutoTokenizer

    client = openai_client(lm_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The bird"}]
    full = client.chat.completions.create(model="x", messages=messages, max_tokens=10)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    tok = AutoTokenizer.from_pretrained(models["chat"])
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content


def test_stop_strings_and_decoding_keys(lm_server):
    client = openai_client(lm_server)
    base = client.completions.create(model="x", prompt="The cat sees", max_tokens=20).choices[0].text
    assert len(base) >= 6
    stop = base[3:5]  # characters in the middle: the completion must end right before their first occurrence
    cut = client.completions.create(model="x", prompt="The cat sees", max_tokens=20, stop=[stop, "@@"])
    assert cut.choices[0].text == base[: base.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="x", prompt="The cat sees", max_tokens=20, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut.choices[0].text
    # bigml generate's keys go in the body (extra_body with the openai client)
    a = client.completions.create(model="x", prompt="The", max_tokens=8, temperature=0.9, seed=3, n=2,
                                  extra_body={"top_k": 5, "repetition_penalty": 1.1})
    b = client.completions.create(model="x", prompt="The", max_tokens=8, temperature=0.9, seed=3, n=2,
                                  extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed holds
    beams = client.completions.create(model="x", prompt="The", max_tokens=6, extra_body={"num_beams": 3})
    assert beams.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(lm_server):
    def err(r, status):
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["message"] and body["type"]
        return body

    url = lm_server.url
    err(httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err(post(lm_server, "/v1/completions", {"prompt": "a", "temprature": 0.5}), 400)["param"] == "temprature"
    assert err(post(lm_server, "/v1/completions", {"prompt": "a", "max_tokens": -3}), 400)["param"] == "max_tokens"
    assert err(post(lm_server, "/v1/completions", {"max_tokens": 3}), 400)["param"] == "prompt"
    assert err(post(lm_server, "/v1/completions", {"prompt": "word " * 200}), 400)["code"] == "context_length_exceeded"
    assert err(post(lm_server, "/v1/completions", {"prompt": "a", "max_tokens": 1000}), 400)["code"] == "context_length_exceeded"
    err(post(lm_server, "/v1/completions", {"prompt": "a", "temperature": 1, "top_p": 2}), 400)
    err(post(lm_server, "/v1/completions", {"prompt": "a", "stream": True, "extra_body": 1}), 400)
    err(post(lm_server, "/v1/completions", {"prompt": "a", "logprobs": 3}), 400)
    err(post(lm_server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    err(post(lm_server, "/v1/predict", {"input": "x"}), 404)
    err(httpx.get(f"{url}/v1/nothing-here"), 404)
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        openai_client(lm_server).completions.create(model="x", prompt="a", max_tokens=-1)
    assert post(lm_server, "/v1/completions", {"prompt": "The", "max_tokens": 3}).status_code == 200


def test_a_client_that_disconnects_mid_stream_is_cancelled_and_nothing_leaks(lm_server):
    def metrics():
        return httpx.get(f"{lm_server.url}/metrics").json()

    before = metrics()["requests"]["cancelled"]
    with httpx.stream("POST", f"{lm_server.url}/v1/completions", timeout=60,
                      json={"prompt": "The", "max_tokens": 60, "stream": True, "temperature": 1.0}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        m = metrics()
        if m["requests"]["cancelled"] > before and m["requests"]["in_flight"] == 0 and m["batches"]["running"] == 0:
            break
        time.sleep(0.1)
    assert m["requests"]["cancelled"] == before + 1 and m["requests"]["in_flight"] == 0, m
    assert m["batches"]["queued"] == 0 and m["batches"]["running"] == 0
    assert post(lm_server, "/v1/completions", {"prompt": "The", "max_tokens": 3}).status_code == 200


def test_concurrent_requests_are_batched_and_answer_as_alone(lm_server):
    prompts = [f"The {w}" for w in "cat dog bird fish model token layer river stone tree sees finds".split()]
    alone = {p: post(lm_server, "/v1/completions", {"prompt": p, "max_tokens": 8}).json()["choices"][0]["text"]
             for p in prompts[:4]}
    before = httpx.get(f"{lm_server.url}/metrics").json()["batches"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: post(lm_server, "/v1/completions", {"prompt": p, "max_tokens": 8}), prompts))
    assert all(r.status_code == 200 for r in results)
    for p, r in zip(prompts, results, strict=True):
        if p in alone:
            assert r.json()["choices"][0]["text"] == alone[p]  # greedy in a left-padded batch = greedy alone
    after = httpx.get(f"{lm_server.url}/metrics").json()
    batches = after["batches"]["count"] - before["count"]
    assert batches < len(prompts) and after["batches"]["largest"] > 1, after["batches"]
    assert after["batches"]["largest"] <= 8
    lat = after["latency"]["/v1/completions"]
    assert lat["count"] >= len(prompts) and lat["p50_ms"] <= lat["p99_ms"]
    assert after["tokens"]["completion"] > 0 and after["tokens"]["completion_per_s"] > 0


def test_health_models_and_metrics(lm_server):
    h = httpx.get(f"{lm_server.url}/health").json()
    assert h["status"] == "ok" and h["task"] == "causal_lm" and "/v1/completions" in h["endpoints"]
    models = openai_client(lm_server).models.list()
    assert [m.id for m in models.data] == ["chat"]
    m = httpx.get(f"{lm_server.url}/metrics").json()
    assert m["requests"]["by_endpoint"]["/health"]["by_status"]["200"] >= 1


# -- task models, masked LMs --------------------------------------------------------------------------

def test_predict_for_a_classifier_matches_transformers(models, module_env):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["good great day", "awful sad trip", "the movie was lovely"]
    with serving(module_env, models["cls"], "serve.workers=2", "serve.max_batch_size=4") as server:
        r = post(server, "/v1/predict", {"input": texts})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        with ThreadPoolExecutor(12) as pool:  # two workers, batches of up to 4 texts: the same answers
            again = list(pool.map(lambda t: post(server, "/v1/predict", {"input": t}).json()["data"][0], texts * 4))
        for got, want in zip(again, data * 4, strict=True):  # padding differs with the batch: float noise only
            assert got["label"] == want["label"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        long = post(server, "/v1/predict", {"input": "good " * 100})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert post(server, "/v1/completions", {"prompt": "x"}).status_code == 404
        assert post(server, "/v1/predict", {"input": []}).status_code == 400
    tok = AutoTokenizer.from_pretrained(models["cls"])
    model = AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()
    with torch.no_grad():
        for text, row in zip(texts, data, strict=True):
            probs = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
            expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
            assert row["probabilities"] == pytest.approx(expected, abs=1e-5)
            assert row["label"] == max(expected, key=expected.get)
    assert {d["label"] for d in data} <= {"pos", "neg"}


def test_regression_and_multilabel_answers_read_the_head(models):
    """The task's answers for the heads not served above, against the head's own output."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bigml.tasks import get_task

    tok = AutoTokenizer.from_pretrained(models["cls"])
    torch.manual_seed(0)
    base = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    reg = BertForSequenceClassification(BertConfig(**base, num_labels=1, problem_type="regression")).eval()
    texts = ["good day", "awful sad trip"]
    with torch.no_grad():
        values = reg(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    assert [a["value"] for a in get_task("regression").predict(reg, tok, texts)] == pytest.approx(values, abs=1e-5)
    labels = ["a", "b", "c"]
    ml = BertForSequenceClassification(BertConfig(**base, num_labels=3, problem_type="multi_label_classification",
                                                  id2label=dict(enumerate(labels)))).eval()
    with torch.no_grad():
        probs = ml(**tok(texts, padding=True, return_tensors="pt")).logits.sigmoid().tolist()
    for row, p in zip(get_task("multilabel").predict(ml, tok, texts), probs, strict=True):
        assert list(row["probabilities"].values()) == pytest.approx(p, abs=1e-5)
        assert row["labels"] == [n for n, v in zip(labels, p, strict=True) if v >= 0.5]


def test_predict_for_a_token_tagger_returns_entity_spans(models, module_env):
    text = "the  good movie was awful"
    with serving(module_env, models["token"]) as server:
        r = post(server, "/v1/predict", {"input": [text]})
        assert r.status_code == 200, r.text
    row = r.json()["data"][0]
    assert [w for w, _ in row["tags"]] == text.split()
    for e in row["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
        assert e["type"] in ("POS", "NEG")
    tagged = {w: t for w, t in row["tags"]}
    assert sorted(e["text"] for e in row["entities"]) == sorted(w for w, t in tagged.items() if t != "O")


def test_fill_mask_matches_the_transformers_pipeline(models, module_env):
    from transformers import pipeline

    with serving(module_env, models["bert"]) as server:
        r = post(server, "/v1/fill-mask", {"input": ["The cat [MASK] the dog.", "A [MASK] sees a [MASK]."], "top_k": 3})
        assert r.status_code == 200, r.text
        assert post(server, "/v1/fill-mask", {"input": "no mask here"}).status_code == 400
        assert post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}).status_code == 404
    data = r.json()["data"]
    fill = pipeline("fill-mask", model=str(models["bert"]), top_k=3)
    expected = fill("The cat [MASK] the dog.")
    assert [f["token"] for f in data[0]["fills"][0]] == [e["token_str"].strip() for e in expected]
    assert [f["score"] for f in data[0]["fills"][0]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert len(data[1]["fills"]) == 2 and all(len(m) == 3 for m in data[1]["fills"])


# -- access, start-up errors -----------------------------------------------------------------------------

def test_api_key_from_the_environment_requires_a_bearer_token(models, module_env):
    from openai import AuthenticationError

    with serving(module_env, models["lm"], extra_env={"BIGML_API_KEY": "s3cret"}) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200  # open, for load balancers
        r = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2},
                    headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        with pytest.raises(AuthenticationError):
            openai_client(server, "wrong").completions.create(model="x", prompt="The", max_tokens=2)
        ok = openai_client(server, "s3cret").completions.create(model="x", prompt="The", max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")
        assert "127.0.0.1" in server.url  # the default: this machine only


def test_start_up_errors_are_one_line_and_exit_2(models, run_script, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        r = run_script("serve", f"model.path={models['lm']}", f"serve.port={port}")
        assert r.code == 2 and f"serve.port={port}" in r.err and "in use" in r.err, r.err
    finally:
        taken.close()
    r = run_script("serve", f"model.path={tmp_path / 'nothing'}")
    assert r.code == 2 and "no such directory" in r.err
    r = run_script("serve", f"model.path={models['lm']}", "serve.workers=0")
    assert r.code == 2 and "serve.workers" in r.err
    assert not (tmp_path / "runs").exists() and list(Path.cwd().glob("runs/serve")) == []
