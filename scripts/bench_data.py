"""Data pipeline: tokenization and packing throughput, memory as the corpus grows 10x, data waits.

    python scripts/bench_data.py --out section.md      # via `make bench BENCH=data`
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import parser, peak_rss_of, table  # noqa: E402


def stdlib_files() -> list[Path]:
    from bigml.data.sources import builtin_corpus_files

    return builtin_corpus_files("python-stdlib")


def make_corpus(root: Path, copies: int) -> int:
    """`copies` copies of the stdlib files (each copy's documents prefixed differently); bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for c in range(copies):
        for i, f in enumerate(stdlib_files()):
            text = f"# copy {c}\n" + f.read_text(encoding="utf-8", errors="replace")
            (root / f"c{c}_{i:04d}.txt").write_text(text)
            total += len(text.encode())
    return total


def tokenize_throughput(tmp: Path) -> list[list]:
    from hydra import compose, initialize_config_dir

    from bigml.data import sources
    from bigml.data.packed import pack_corpus
    from bigml.data.tokenizer import train_or_load
    from bigml.tasks import get_task

    rows = []
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    for model, kind, task_name in (("gpt-tiny", "bpe", "causal_lm"), ("bert-tiny", "wordpiece", "masked_lm")):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("pretrain", overrides=[f"model={model}", f"cache_dir={tmp / kind}"])
        files = sources.corpus_files(cfg.data)
        mb = sum(f.stat().st_size for f in files) / 1e6
        key = sources.fingerprint(cfg.data, files)
        task = get_task(task_name)
        ds = sources.load_documents(cfg.data, files)
        t0 = time.perf_counter()
        tok, _ = train_or_load(cfg.tokenizer, task, key, lambda ds=ds: (t for t in ds["text"]), str(cfg.cache_dir), 512)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        info, _ = pack_corpus(cfg.data, tok, task, lambda ds=ds: ds, key, str(cfg.cache_dir), 0, 0.05)
        t_pack = time.perf_counter() - t0
        rows.append([kind, f"{mb:.1f}", f"{t_tok:.1f}", f"{mb / t_tok:.1f}", f"{t_pack:.1f}", f"{mb / t_pack:.1f}",
                     f"{info.n_tokens:,}"])
    return rows


def main() -> None:
    a = parser(__doc__).parse_args()
    steps = 10 if a.quick else 60
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tok_rows = tokenize_throughput(tmp)
        mem_rows = []
        for copies in ((1, 2) if a.quick else (1, 10)):
            corpus = tmp / f"corpus{copies}"
            size = make_corpus(corpus, copies)
            env = {"BIGML_CACHE_DIR": str(tmp / f"cache{copies}"), "CI": "1"}
            common = ["pretrain", "model=gpt-mini", f"data.path={corpus}", f"trainer.max_steps={steps}", "trainer.val_check_interval=1000",
                      "logger=none", "checkpoint.every_n_steps=1000"]
            cold_rss, cold_wall, _ = peak_rss_of([*common, f"hydra.run.dir={tmp}/cold{copies}"], env)
            warm_rss, warm_wall, m = peak_rss_of([*common, f"hydra.run.dir={tmp}/warm{copies}"], env)
            mem_rows.append([f"{copies}x", f"{size / 1e6:.0f}", f"{cold_rss:.0f}", f"{warm_rss:.0f}",
                             f"{m['data_wait_fraction'] * 100:.2f}%", f"{m['tokens_per_sec']:.0f}"])
        ratio_size = float(mem_rows[-1][1]) / float(mem_rows[0][1])
        ratio_rss = float(mem_rows[-1][3]) / float(mem_rows[0][3])
    cmd = "bigml pretrain model=gpt-mini data.path=<corpus> trainer.max_steps=60 ..."
    text = f"""## Data pipeline

**Tokenizer training and packing** of the default corpus (Python standard library), cold cache,
in-process (`bigml.data.tokenizer.train_or_load`, `bigml.data.packed.pack_corpus`; the
`bigml pretrain` log prints the same timings):

{table(["tokenizer", "corpus MB", "train s", "train MB/s", "tokenize+pack s", "tokenize+pack MB/s", "tokens"], tok_rows)}

**Memory as the corpus grows** (`{cmd}`; the corpus is the stdlib copied N times; peak resident
memory of the whole process sampled every 50 ms; "cold" includes tokenizer training and packing,
"warm" reads the cached memory-mapped tokens and only trains):

{table(["corpus", "MB", "peak RSS cold (MiB)", "peak RSS training (MiB)", "data wait / step time", "tokens/s"], mem_rows)}

A {ratio_size:.0f}x larger corpus changes peak training memory by {ratio_rss:.2f}x: training reads
blocks from the memory map, so resident memory does not follow the corpus size. The loader waits
are the share of training time spent between steps (loading the next batch, logging): target
under 5%.
"""
    a.out.write_text(text)


if __name__ == "__main__":
    main()
