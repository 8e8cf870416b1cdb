"""Regenerate ``docs/demo_output.txt``: what ``cellfm-sc demo --quiet`` prints.

The quick start and the SEA-AD tutorial include that file, and ``tests/test_docs.py`` fails
when the demo prints something else (apart from the run time and the report's absolute path),
so rerun this script whenever the demo's numbers change::

    python docs/make_demo_output.py

It runs the installed ``cellfm-sc`` in a temporary folder (about 1-2 minutes on 2 CPU cores)
and writes the output with the temporary folder shown as ``/home/me``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "demo_output.txt"
COMMAND = ["demo", "--quiet"]
SHOWN_HOME = "/home/me"


def demo_command() -> list[str]:
    exe = shutil.which("cellfm-sc")
    return [exe] if exe else [sys.executable, "-m", "cellfm_sc.cli"]


def run_demo(cwd: Path) -> str:
    """Run the demo in ``cwd``; return its stdout with ``cwd`` shown as ``/home/me``."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*demo_command(), *COMMAND], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cellfm-sc demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.replace(str(cwd.resolve()), SHOWN_HOME).replace(str(cwd), SHOWN_HOME)


def normalise(text: str) -> str:
    """The demo's output without what differs between runs (run time, absolute paths)."""
    text = re.sub(r"done in \d+ s", "done in N s", text)
    text = re.sub(r"report: \S+/cellfm_demo/", "report: .../cellfm_demo/", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = run_demo(Path(tmp))
    TARGET.write_text(f"$ cellfm-sc {' '.join(COMMAND)}\n{out}", encoding="utf-8")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
