"""Combine the `<!-- bench:NAME -->` sections of several BENCHMARKS.md versions into one file.

    python scripts/merge_bench_sections.py OUT IN1 IN2 ...   # later inputs win for the same section

For merging branches that each ran their own benchmarks (git's line merge can't, both files start
with the same header): sections are independent, so the union of sections is the right result.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import HEADER  # noqa: E402

SECTION = re.compile(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", re.S)


def main(out: str, *inputs: str) -> None:
    sections: dict[str, str] = {}
    for path in inputs:
        for m in SECTION.finditer(Path(path).read_text()):
            sections[m.group(1)] = m.group(0)
    Path(out).write_text(HEADER + "".join(f"\n{s}\n" for s in sections.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])
