"""Shared helpers for scripts/bench_*.py: machine facts, timing, markdown sections.

Every benchmark script writes one markdown section (to --out) that scripts/run_benchmarks.py
splices into BENCHMARKS.md between `<!-- bench:NAME -->` markers, so one script can be re-run
alone (`make bench BENCH=generate`) without losing the others' figures. Sections state their
commands and the machine, and compare variants measured side by side in the same run (the
machines are shared and noisy: ratios hold up, absolute times drift).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    from bigml.hardware import cpu_has_fast_bf16, cpu_name

    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    from bigml.hardware import cpu_flags

    native = "AMX" if "amx_bf16" in cpu_flags() else "AVX512-BF16, no AMX" if "avx512_bf16" in cpu_flags() else "no bf16 instructions"
    bf16 = f"{native}: bf16 {'faster' if cpu_has_fast_bf16() else 'not faster'} than fp32 (precision=auto picks {'bf16-mixed' if cpu_has_fast_bf16() else '32-true'})"
    load = f"; load average {os.getloadavg()[0]:.1f} when the section was written" if hasattr(os, "getloadavg") else ""
    return (f"{cpu_name()}, {cores} cores, {mem_gb:.0f} GiB, {gpu}, {bf16}; torch {torch.__version__}, "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}{load}")


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, min seconds) of `fn` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def bigml_cmd(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = True) -> tuple[float, str, str]:
    """Run the installed console script; (wall seconds, stdout, stderr)."""
    exe = shutil.which("bigml", path=str(Path(sys.executable).parent)) or "bigml"
    t0 = time.perf_counter()
    p = subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    wall = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise RuntimeError(f"bigml {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stdout, p.stderr


def table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True, help="markdown file for this benchmark's section")
    p.add_argument("--quick", action="store_true", help="fewer steps/repeats: check the script runs")
    return p


def peak_rss(argv: list[str], env: dict | None = None) -> tuple[float, float, str, str]:
    """Run `argv`, sampling its resident memory every 50 ms: (peak MiB, wall seconds, stdout, stderr).
    Raises RuntimeError with the end of stderr when it fails."""
    import threading

    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak, stop = psutil.Process(p.pid), 0, False

    def sample():
        nonlocal peak
        while not stop:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    th = threading.Thread(target=sample)
    th.start()
    out, err = p.communicate()
    stop = True
    th.join()
    if p.returncode != 0:
        raise RuntimeError(err[-3000:])
    return peak / 2**20, time.perf_counter() - t0, out, err


def peak_rss_of(cmd_args: list[str], env: dict | None = None) -> tuple[float, float, dict]:
    """Run `bigml <cmd_args>` (which must set hydra.run.dir=) with peak_rss: (peak MiB, wall seconds,
    the run's metrics.json)."""
    import json

    exe = shutil.which("bigml", path=str(Path(sys.executable).parent)) or "bigml"
    peak, wall, _, _ = peak_rss([exe, *cmd_args], env)
    run_dir = next(a.split("=", 1)[1] for a in cmd_args if a.startswith("hydra.run.dir="))
    return peak, wall, json.loads(Path(run_dir, "metrics.json").read_text())
