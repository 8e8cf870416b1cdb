"""How long ``cellfm-sc`` takes from the command to its answer on common mistakes.

Each case runs the command line in a fresh Python process (``python -m cellfm_sc.cli``) and
times it from the start of the process to its exit (wall clock), ``--repeats`` times,
interleaved (case 1, 2, ..., then again), so a changing load from other jobs hits every case
alike; the table gives the median and the fastest run. Beside the command line:
``python -c "from cellfm_sc import CellFMClassifier"`` (the notebook's first import) and
``python -c "import cellfm_sc"``.

Cases (a 300-cell ``.h5ad`` written to a temporary folder): a labels column that does not
exist, a layer that does not exist, ``--accelerator gpu`` (on a machine without a CUDA GPU),
a missing model directory for ``predict``, and ``--help``.

``--src A --src B`` times several source trees side by side (``PYTHONPATH`` set to each), e.g.
the tree before and after a change::

    python benchmarks/bench_cli_startup.py --src /path/to/old/src --src src --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cases(data: Path, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "cellfm_sc.cli"]
    base = [*cli, "finetune", str(data), "--preset", "tiny", "-o", str(out)]
    return {
        "finetune: --labels-key not a column": [*base, "--labels-key", "cell_type"],
        "finetune: --layer not a layer": [*base, "--labels-key", "celltype", "--layer", "counts"],
        "finetune: --accelerator gpu, no GPU": [
            *base,
            "--labels-key",
            "celltype",
            "--accelerator",
            "gpu",
        ],
        "predict: no model directory": [
            *cli,
            "predict",
            str(out / "nomodel"),
            str(data),
            "-o",
            str(out / "o.h5ad"),
        ],
        "cellfm-sc --help": [*cli, "--help"],
        "from cellfm_sc import CellFMClassifier": [
            sys.executable,
            "-c",
            "from cellfm_sc import CellFMClassifier",
        ],
        "import cellfm_sc": [sys.executable, "-c", "import cellfm_sc"],
    }


def timed(command: list[str], src: str) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", default=None, help="source tree(s) to time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sources = args.src or [str(REPO / "src")]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=sources[-1])
        data = Path(tmp) / "cells.h5ad"
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import cellfm_sc; cellfm_sc.datasets.pbmc3k()[:300].copy()"
                f".write_h5ad({str(data)!r})",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        table = cases(data, Path(tmp) / "out")
        times: dict[tuple[str, str], list[float]] = {}
        codes: dict[tuple[str, str], int] = {}
        for command in table.values():  # warm the file cache once
            for src in sources:
                timed(command, src)
        for _ in range(args.repeats):
            for name, command in table.items():
                for src in sources:
                    t, rc = timed(command, src)
                    times.setdefault((name, src), []).append(t)
                    codes[(name, src)] = rc
    width = max(map(len, table))
    header = f"| {'case':<{width}} | " + " | ".join(
        f"{Path(s).parent.name or s}/src: median (min) s, exit" for s in sources
    )
    print(header + " |")
    print("| " + "-" * width + " |" + " --- |" * len(sources))
    for name in table:
        cells = []
        for src in sources:
            values = times[(name, src)]
            cells.append(
                f"{statistics.median(values):.2f} ({min(values):.2f}), {codes[(name, src)]}"
            )
        print(f"| {name:<{width}} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
