"""`make bench`: run scripts/bench_*.py and splice their sections into BENCHMARKS.md.

    python scripts/run_benchmarks.py                 # every benchmark
    python scripts/run_benchmarks.py generate pretrain   # only these (others keep their figures)
    make bench BENCH=generate,pretrain               # the same through make
    BENCH_QUICK=1 make bench                         # smoke-test the scripts (figures not meaningful)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine  # noqa: E402

HEADER = """# Benchmarks

Written by `make bench` (scripts/run_benchmarks.py, which runs scripts/bench_*.py). Each section
names its command and machine; ratios are measured side by side in the same run, because these
machines are shared and absolute times drift by 10-20% between runs.
"""


def main(argv: list[str]) -> int:
    names = argv or [p.stem.removeprefix("bench_") for p in sorted((REPO / "scripts").glob("bench_*.py"))]
    target = REPO / "BENCHMARKS.md"
    failed = []
    for name in names:
        script = REPO / "scripts" / f"bench_{name}.py"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.md"
            print(f"== bench_{name}", flush=True)
            p = subprocess.run([sys.executable, str(script), "--out", str(out), *(["--quick"] if os.environ.get("BENCH_QUICK") else [])])
            if p.returncode != 0 or not out.exists():
                failed.append(name)
                continue
            section = f"<!-- bench:{name} -->\n{out.read_text().strip()}\n\n_Machine: {machine()}_\n<!-- /bench:{name} -->"
        text = target.read_text() if target.exists() else HEADER  # re-read: others may have written meanwhile
        pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
        text = pattern.sub(lambda _, s=section: s, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        target.write_text(text)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
