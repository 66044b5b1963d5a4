"""Peer measurement: LitGPT's `litgpt pretrain` on bigml's benchmark shape; prints tokens/s last.

Trains, with the real `litgpt pretrain` CLI in a subprocess (which wraps the model in
torch.compile, always), the same GPT-2 shape as scripts/bench_pretrain.py (model=gpt-mini: 4 layers
x 256, 4 heads, MLP 1024, vocab 8192, tied embeddings; micro batch = global batch = 16 x 256
tokens; AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1; clip 1.0; cosine) on the same corpus
(the Python standard library's .py files, tests excluded) with a byte-level BPE tokenizer built the
way bigml builds its own (vocab 8192, min frequency 2, `<|endoftext|>` as bos/eos).

    python scripts/peer_litgpt.py --precision bf16-mixed --steps 40 \\
        [--litgpt-python .bench/litgpt/bin/python]

The launcher is bigml's own interpreter (it needs only the stdlib and `tokenizers`); LitGPT runs
from its own virtual environment, since its pins (torch, lightning, jsonargparse) differ from
bigml's. Create that environment once:

    python3 -m venv .bench/litgpt
    .bench/litgpt/bin/pip install torch==2.13.0 litgpt==0.5.13 litdata

That is all that is needed (checked with `pip install --dry-run --report`): litgpt brings
jsonargparse[signatures] (its CLI), lightning, tokenizers and huggingface-hub; litdata (the
TextFiles data module's chunk format) brings requests. Pin torch: litgpt asks only for torch>=2.7,
and an unpinned install takes the newest CUDA build (2.14.1+cu130, 3 GB of nvidia wheels). Where
pip has no local CPU wheel, add `--extra-index-url https://download.pytorch.org/whl/cpu`.

The interpreter is --litgpt-python, else $BIGML_LITGPT_PYTHON, else .bench/litgpt/bin/python in
this repository; when it is missing or cannot import litgpt the script exits with status 2.

Preparation is cached under --cache-dir (default ~/.cache/bigml-bench/litgpt) and not timed: the
stdlib copied as .txt files (every 20th file held out as the validation set, like bigml's 5%), the
tokenizer (tokenizer.json + tokenizer_config.json, what litgpt's `Tokenizer` reads) and litdata's
optimized token chunks, made by LitGPT's own `TextFiles.prepare_data` and moved into place
atomically. Each run then executes (paths abbreviated; `--print-command` shows the exact one):

    litgpt pretrain gpt-mini --model_config '{"name": "gpt-mini", "block_size": 256, "n_layer": 4,
        "n_embd": 256, "n_head": 4, "n_query_groups": 4, "intermediate_size": 1024,
        "vocab_size": 8192, "padded_vocab_size": 8192, "rotary_percentage": 1.0,
        "parallel_residual": false, "bias": true, "attn_bias": true, "norm_class_name": "LayerNorm",
        "norm_eps": 1e-05, "mlp_class_name": "GptNeoxMLP", "gelu_approximate": "tanh"}' \\
      --precision bf16-mixed --devices 1 --seed 42 \\
      --data TextFiles --data.train_data_path CACHE/corpus-KEY/train-txt \\
      --data.val_data_path CACHE/corpus-KEY/val-txt --data.num_workers 1 \\
      --tokenizer_dir CACHE/tokenizer-KEY \\
      --train.micro_batch_size 16 --train.global_batch_size 16 --train.max_tokens STEPS*4096 \\
      --train.lr_warmup_steps 2 --train.min_lr 1e-4 --train.max_norm 1.0 \\
      --train.tie_embeddings true --train.log_interval 1 --train.save_interval null \\
      --eval.interval 1000000 --eval.final_validation false \\
      --optimizer '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001,
                     "betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.1}}' \\
      --logger_name csv --out_dir TMP/out

Shape differences that LitGPT cannot avoid: it has no learned position embeddings (rotary on the
full head instead: 65k fewer parameters, a few elementwise ops more), and it applies weight decay to
every parameter (bigml exempts biases and norm gains; no effect on speed). On CPU it builds AdamW
with `fused=False` (the foreach implementation), where bigml uses torch's fused kernel.

Tokens/s: LitGPT logs, per iteration, the wall time since its training loop started
(`time`, from Lightning's ThroughputMonitor) and the tokens seen so far; the figure is
(tokens[N] - tokens[W]) / (time[N] - time[W]) with W = 5, so the first five iterations (the
torch.compile of the training graph included) are excluded, as for bench_pretrain's variants. It
covers everything inside the loop: data loading, forward/backward, clipping, optimizer, logging.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5  # iterations excluded from the figure (as bench_pretrain.WARMUP)
BLOCK, BATCH, VOCAB = 256, 16, 8192
SPECIAL = "<|endoftext|>"  # bos = eos, as bigml's causal tokenizers; pad/unk as bigml too
SPECIALS = [SPECIAL, "<|pad|>", "<|unk|>"]
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
PREP_VERSION = 1  # bump when the preparation below changes, to invalidate caches

# The closest LitGPT Config to GPT-2 (transformers GPT2Config as bigml's gpt-mini sets it).
MODEL_CONFIG = {
    "name": "gpt-mini", "block_size": BLOCK, "n_layer": 4, "n_embd": 256, "n_head": 4, "n_query_groups": 4,
    "intermediate_size": 1024, "vocab_size": VOCAB, "padded_vocab_size": VOCAB,
    "rotary_percentage": 1.0,  # LitGPT has no learned positions; RoPE over the whole head
    "parallel_residual": False,  # GPT-2: x + attn(ln1(x)), then + mlp(ln2(x))
    "bias": True, "attn_bias": True,  # biases on qkv, projections and MLP as GPT-2
    "norm_class_name": "LayerNorm", "norm_eps": 1e-5,
    "mlp_class_name": "GptNeoxMLP", "gelu_approximate": "tanh",  # fc -> tanh-GELU -> proj
}
OPTIMIZER = {"class_path": "torch.optim.AdamW",
             "init_args": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}

# Run with LitGPT's interpreter: its own TextFiles.prepare_data tokenizes the files and writes
# litdata chunks (blocks of BLOCK + 1 tokens: LitGPT needs the next token as the target).
PREPARE_SNIPPET = """
import sys
from pathlib import Path
from litgpt.data import TextFiles
from litgpt.tokenizer import Tokenizer
root, tok, block, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = TextFiles(train_data_path=root / "train-txt", val_data_path=root / "val-txt")
data.connect(tokenizer=Tokenizer(tok), batch_size=batch, max_seq_length=block)
data.prepare_data()
"""


def fail(msg: str, code: int = 1) -> None:
    print(f"peer_litgpt: {msg}", file=sys.stderr)
    sys.exit(code)


def find_litgpt(python: str | None) -> tuple[Path, Path]:
    """(interpreter, `litgpt` console script) of the LitGPT environment; exits 2 when unusable."""
    candidates = [python, os.environ.get("BIGML_LITGPT_PYTHON"), str(REPO / ".bench/litgpt/bin/python")]
    py = Path(next(c for c in candidates if c))
    how = "python3 -m venv .bench/litgpt && .bench/litgpt/bin/pip install torch==2.13.0 litgpt==0.5.13 litdata"
    if not py.exists():
        fail(f"no LitGPT interpreter at {py}; create it with `{how}` or pass --litgpt-python", 2)
    exe = py.parent / "litgpt"
    probe = subprocess.run([str(py), "-c", "import litgpt, litdata"], capture_output=True, text=True)
    if probe.returncode != 0 or not exe.exists():
        err = (probe.stderr.strip().splitlines() or ["no `litgpt` console script next to it"])[-1]
        fail(f"{py} cannot run LitGPT ({err}); install it with `{how}`", 2)
    return py, exe


def litgpt_env() -> dict[str, str]:
    """The environment for LitGPT's processes: offline, and nothing leaking in from bigml's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def stdlib_files() -> list[Path]:
    """The corpus of bench_pretrain (bigml's python-stdlib data): this interpreter's stdlib .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not STDLIB_SKIP.intersection(p.relative_to(root).parts))


def cache_key(files: list[Path], *extra: object) -> str:
    h = hashlib.sha256(json.dumps([PREP_VERSION, *map(str, extra)]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; a concurrent run may have won the race."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_tokenizer(files: list[Path], out: Path) -> None:
    """Byte-level BPE exactly as bigml's tokenizer.kind=bpe (bigml/data/tokenizer.py), in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():  # bigml feeds at most train_max_mb=64 MB; the stdlib is smaller
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    # litgpt.Tokenizer reads bos/eos from here and requires a tokenizer_class key.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL, "eos_token": SPECIAL,
        "pad_token": "<|pad|>", "unk_token": "<|unk|>", "add_bos_token": False, "model_max_length": BLOCK,
    }, indent=2))


def prepare(cache: Path, py: Path) -> tuple[Path, Path]:
    """(corpus dir, tokenizer dir), building whatever the cache lacks. Not timed."""
    files = stdlib_files()
    if len(files) < 40:
        fail(f"only {len(files)} stdlib files found under {sysconfig.get_paths()['stdlib']}")
    cache.mkdir(parents=True, exist_ok=True)
    tok_dir = cache / f"tokenizer-{cache_key(files, VOCAB)}"
    if not tok_dir.exists():
        print(f"peer_litgpt: training the tokenizer -> {tok_dir}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tok-")) / "t"
        build_tokenizer(files, tmp)
        publish(tmp, tok_dir)
        shutil.rmtree(tmp.parent, ignore_errors=True)

    corpus = cache / f"corpus-{cache_key(files, VOCAB, BLOCK, tok_dir.name)}"
    if not corpus.exists():
        print(f"peer_litgpt: writing the corpus and litdata chunks -> {corpus}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".corpus-"))
        root = Path(sysconfig.get_paths()["stdlib"])
        for sub in ("train-txt", "val-txt"):
            (tmp / sub).mkdir()
        for i, f in enumerate(files):  # every 20th document held out (bigml: val_fraction 0.05)
            name = "__".join(f.relative_to(root).with_suffix(".txt").parts)
            text = f.read_text(encoding="utf-8", errors="replace")
            (tmp / ("val-txt" if i % 20 == 0 else "train-txt") / name).write_text(text, encoding="utf-8")
        p = subprocess.run([str(py), "-c", PREPARE_SNIPPET, str(tmp), str(tok_dir), str(BLOCK), str(BATCH)],
                           capture_output=True, text=True, env=litgpt_env(), cwd=tmp)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            fail(f"litdata preparation failed:\n{p.stderr[-3000:]}")
        publish(tmp, corpus)
    return corpus, tok_dir


def litgpt_command(exe: Path, corpus: Path, tok_dir: Path, out: Path, precision: str, steps: int,
                   num_workers: int) -> list[str]:
    return [
        str(exe), "pretrain", MODEL_CONFIG["name"], "--model_config", json.dumps(MODEL_CONFIG),
        "--precision", precision, "--devices", "1", "--seed", "42",
        "--data", "TextFiles", "--data.train_data_path", str(corpus / "train-txt"),
        "--data.val_data_path", str(corpus / "val-txt"), "--data.num_workers", str(num_workers),
        "--tokenizer_dir", str(tok_dir),
        "--train.micro_batch_size", str(BATCH), "--train.global_batch_size", str(BATCH),  # no accumulation
        "--train.max_tokens", str(steps * BATCH * BLOCK),  # pretrain stops on tokens: exactly `steps` iterations
        "--train.lr_warmup_steps", "2", "--train.min_lr", "1e-4", "--train.max_norm", "1.0",
        "--train.tie_embeddings", "true",  # GPT-2 ties wte and lm_head, as bigml's gpt-mini (5.4M params)
        "--train.log_interval", "1", "--train.save_interval", "null",
        # no validation inside the loop (LitGPT still runs its 2-batch sanity check before it, untimed)
        "--eval.interval", "1000000", "--eval.final_validation", "false",
        "--optimizer", json.dumps(OPTIMIZER),
        "--logger_name", "csv", "--out_dir", str(out),
    ]


def steady_tokens_per_sec(metrics_csv: Path, steps: int) -> float:
    """Tokens/s over iterations WARMUP+1..N from LitGPT's per-iteration CSV metrics."""
    rows: dict[int, tuple[float, float]] = {}
    with open(metrics_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get("iter") and r.get("time") and r.get("tokens"):
                rows[int(float(r["iter"]))] = (float(r["time"]), float(r["tokens"]))
    if len(rows) != steps or WARMUP not in rows:
        fail(f"{metrics_csv}: expected {steps} logged iterations, found {len(rows)}")
    (t0, n0), (t1, n1) = rows[WARMUP], rows[max(rows)]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="bf16-mixed")
    ap.add_argument("--steps", type=int, default=40, help=f"training iterations (> {WARMUP})")
    ap.add_argument("--litgpt-python", help="interpreter of the LitGPT venv (see the module docstring)")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/bigml-bench/litgpt").expanduser())
    ap.add_argument("--num-workers", type=int, default=1,
                    help="LitGPT dataloader workers (its TextFiles default is 4, too many for a 2-core machine)")
    ap.add_argument("--print-command", action="store_true", help="print the litgpt command line to stderr")
    ap.add_argument("--verbose", action="store_true", help="stream LitGPT's output to stderr")
    ap.add_argument("--check", action="store_true", help="only check that LitGPT is installed (exit 0) or not (2)")
    a = ap.parse_args()
    if a.check:
        find_litgpt(a.litgpt_python)
        return
    if a.steps <= WARMUP + 1:
        fail(f"--steps must exceed {WARMUP + 1}")

    py, exe = find_litgpt(a.litgpt_python)
    corpus, tok_dir = prepare(a.cache_dir, py)
    with tempfile.TemporaryDirectory(prefix="peer-litgpt-") as tmp:
        out = Path(tmp, "out")
        cmd = litgpt_command(exe, corpus, tok_dir, out, a.precision, a.steps, a.num_workers)
        if a.print_command:
            print(shlex.join(cmd), file=sys.stderr)
        # LitGPT's output never goes to our stdout: its last line must stay the figure.
        p = subprocess.run(cmd, env=litgpt_env(), cwd=tmp, text=True,
                           stdout=sys.stderr if a.verbose else subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            fail(f"`litgpt pretrain` failed ({p.returncode}):\n{(p.stdout or '')[-4000:]}")
        metrics = sorted(out.glob("logs/csv/version_*/metrics.csv"))
        if not metrics:
            fail(f"LitGPT wrote no metrics.csv under {out}/logs")
        print(f"{steady_tokens_per_sec(metrics[-1], a.steps):.1f}")


if __name__ == "__main__":
    main()
