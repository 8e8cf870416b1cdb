"""The numbers the documentation quotes from ``benchmarks/RESULTS.md``, as generated snippets.

``conf.py`` calls :func:`write_benchmark_summary` at every build; the benchmarks page and the
SEA-AD tutorial include the snippets it writes into ``docs/generated/``, so no page types a
benchmark number by hand: rerun a benchmark, update ``RESULTS.md``, and the pages follow.
``tests/test_docs.py`` checks that the pages include the snippets and quote no other
throughput or memory figures.

Run ``python docs/_ext/bench_summary.py`` to print the snippets.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

#: nuclei in the SEA-AD MTG snRNA-seq atlas (rounded; the portals' files hold ~1.4 million)
SEA_AD_NUCLEI = 1.4e6
#: common GPU memory sizes (GiB) for the "smallest GPU" column
GPU_SIZES = (8, 12, 16, 24, 32, 40, 48, 80, 94, 141)
#: head-room on top of the measured peak (CUDA context, allocator fragmentation)
HEADROOM = 1.25

GPU_SECTION = "## model: GPU training-step throughput"
E2E_SECTION = "## model: end-to-end fine-tune through the public API on a GPU"
BACKED_SECTION = "## model: peak memory of training + inference on backed `.h5ad`"
SHIFT_SECTION = "## model: pretraining and fine-tuning recipes on shifted data"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def _table(section: str) -> list[dict[str, str]]:
    """The first markdown table of a section, as rows of {header: cell}."""
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"no table in section {section.splitlines()[0]!r}")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def _number(cell: str) -> float | None:
    m = re.search(r"[-+]?\d[\d,]*\.?\d*", cell)
    return float(m.group(0).replace(",", "")) if m else None


def _machine(section: str) -> str:
    m = re.search(r"Machine: one (NVIDIA [^,(]+?)(?:\s*\(|,)", section)
    return m.group(1).strip() if m else "one GPU"


def _smallest_gpu(peak_gib: float) -> str:
    need = peak_gib * HEADROOM
    for size in GPU_SIZES:
        if size >= need:
            return f"{size} GB"
    return f"> {GPU_SIZES[-1]} GB"


def _rate(cells_per_s: float) -> str:
    return f"{cells_per_s:,.0f}" if cells_per_s >= 100 else f"{cells_per_s:g}"


def _minutes(cells_per_s: float) -> str:
    minutes = SEA_AD_NUCLEI / cells_per_s / 60
    if minutes >= 90:
        return f"{minutes / 60:.1f} h"
    return f"{round(minutes)} min"


def gpu_rows(results: str) -> list[dict[str, str]]:
    """The GPU training-step table of RESULTS.md with the derived columns."""
    section = _section(results, GPU_SECTION)
    out = []
    for row in _table(section):
        cells_s = _number(row.get("train cells/s", ""))
        peak = _number(row.get("peak GPU memory (train)", ""))
        oom = "out of memory" in row.get("train cells/s", "")
        out.append(
            {
                "preset": row["preset"],
                "precision": row["precision"],
                "batch": row["batch"],
                "trainable": re.sub(r"\s*\(.*\)", "", row["trainable"]),
                "cells_s": "out of memory" if oom else _rate(cells_s) if cells_s else "",
                "epoch": "" if oom or not cells_s else _minutes(cells_s),
                "peak": row.get("train cells/s", "") if oom else row["peak GPU memory (train)"],
                "gpu": "" if oom or peak is None else _smallest_gpu(peak),
            }
        )
    return out


def summary_markdown(results: str) -> str:
    """The decision table that leads the benchmarks page."""
    section = _section(results, GPU_SECTION)
    machine = _machine(section)
    lines = [
        f"Measured on {machine} with eager PyTorch, every cell at 2,048 expressed genes "
        "(the worst case; SEA-AD nuclei hold fewer, and batches are padded only to their "
        f"longest cell). *One SEA-AD epoch* = {SEA_AD_NUCLEI / 1e6:.1f} M nuclei / train "
        f"cells per second. *Smallest GPU* = the smallest common card with at least "
        f"{HEADROOM:.2f} x the measured peak (room for the CUDA context and fragmentation).",
        "",
        "| model | precision | batch | what trains | train cells/s | one SEA-AD epoch "
        "| peak GPU memory | smallest GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in gpu_rows(results):
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['batch']} | {r['trainable']} | "
            f"{r['cells_s']} | {r['epoch']} | {r['peak']} | {r['gpu']} |"
        )
    return "\n".join(lines) + "\n"


def reading_markdown(results: str) -> str:
    """The "how to read it" bullets under the decision table, with derived figures."""
    rows = {(r["preset"], r["precision"], r["batch"], r["trainable"]): r for r in gpu_rows(results)}
    default = rows[("80M", "bf16-mixed", "16", "encoder+head")]
    fp32 = rows[("80M", "fp32", "16", "encoder+head")]
    big = rows[("80M", "bf16-mixed", "64", "encoder+head")]
    gc800 = rows[("800M, gradient checkpointing", "bf16-mixed", "16", "encoder+head")]
    rate = {k: float(r["cells_s"].replace(",", "")) for k, r in rows.items() if r["epoch"]}
    key = ("80M", "bf16-mixed", "16", "encoder+head")
    slower_fp32 = rate[key] / rate[("80M", "fp32", "16", "encoder+head")]
    slower_800 = (
        rate[key] / rate[("800M, gradient checkpointing", "bf16-mixed", "16", "encoder+head")]
    )
    gain_big = rate[("80M", "bf16-mixed", "64", "encoder+head")] / rate[key] - 1
    backed = _table(_section(results, BACKED_SECTION))
    rss = max(_number(r["peak RSS (MiB)"]) or 0 for r in backed)
    machine = _machine(_section(results, GPU_SECTION))
    return (
        "\n".join(
            [
                f"- **80M, the default** (bf16-mixed, batch 16, encoder and head train) fits a "
                f"{default['gpu']} GPU; an epoch over the whole SEA-AD atlas takes about "
                f"{default['epoch']} on the {machine}, proportionally longer on slower GPUs. fp32 "
                f"(GPUs without bfloat16) is {slower_fp32:.1f} times slower ({fp32['epoch']}).",
                f"- **Larger batches** buy little: batch 64 is {gain_big:.0%} faster than 16 and "
                f"needs {big['peak']}.",
                f"- **800M** does not fit as is {rows[('800M', 'bf16-mixed', '16', 'encoder+head')]['peak'].replace('out of memory ', '')}; "
                f"with gradient checkpointing (`train(gradient_checkpointing=True)`) it fits a "
                f"{gc800['gpu']} GPU and is {slower_800:.0f} times slower than 80M "
                f"({gc800['epoch']} per SEA-AD epoch).",
                f"- **Host memory** does not grow with the data: on backed `.h5ad` files a whole "
                f"training and inference run peaked at {rss:,.0f} MiB, flat in the number of cells; "
                "the count matrix is never loaded.",
                '- **No GPU**: the `"tiny"` and `"small"` presets (random initialisation) train '
                "on CPUs, as the demo does; the released 80M model is too slow on CPUs for more "
                "than a smoke test.",
            ]
        )
        + "\n"
    )


def sea_ad_epoch_markdown(results: str) -> str:
    """The 80M time and memory per SEA-AD epoch, for the tutorial."""
    rows = {(r["preset"], r["precision"], r["batch"], r["trainable"]): r for r in gpu_rows(results)}
    default = rows[("80M", "bf16-mixed", "16", "encoder+head")]
    fp32 = rows[("80M", "fp32", "16", "encoder+head")]
    machine = _machine(_section(results, GPU_SECTION))
    e2e = _table(_section(results, E2E_SECTION))
    peak_e2e = next(r["result"] for r in e2e if r["step"].startswith("peak GPU memory"))
    backed = _table(_section(results, BACKED_SECTION))
    rss = max(_number(r["peak RSS (MiB)"]) or 0 for r in backed)
    return (
        f"| 80M, batch 16, default settings (encoder + head train) | on {machine} |\n"
        "|---|---|\n"
        f"| one epoch over {SEA_AD_NUCLEI / 1e6:.1f} M nuclei, bf16-mixed | "
        f"about {default['epoch']} ({default['cells_s']} cells/s) |\n"
        f"| the same in fp32 (GPUs without bf16) | about {fp32['epoch']} "
        f"({fp32['cells_s']} cells/s) |\n"
        f"| peak GPU memory, bf16-mixed | {default['peak']} (fits a {default['gpu']} GPU) |\n"
        f"| peak GPU memory in a whole fine-tuning run (3,000 cells, 80M) | {peak_e2e} |\n"
        f"| host memory of the data path on a backed file | under {math.ceil(rss / 100) / 10:.1f}"
        " GiB, flat in the number of cells |\n"
    )


def _tables(section: str) -> list[str]:
    """Every markdown table of a section, verbatim."""
    tables, current = [], []
    for ln in [*section.splitlines(), ""]:
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def shift_markdown(results: str) -> str:
    """The shift benchmark's tables (recipes on in-distribution and shifted cells, the
    pretraining probe per epoch), for the pretraining page."""
    tables = _tables(_section(results, SHIFT_SECTION))
    if len(tables) < 2:
        raise ValueError(f"{SHIFT_SECTION!r} needs its recipe and probe tables")
    return (
        "Macro-F1 on the 540 held-out PBMC 3k cells, as they are (*same*) and shifted; "
        "mean ± sd over 3 label draws:\n\n"
        + tables[0]
        + "\n\nThe pretraining probes after every epoch (kNN macro-F1 on the trunk's cell "
        "embeddings; before training: a random trunk):\n\n"
        + tables[1]
        + "\n"
    )


def write_benchmark_summary(results_path: str | Path, out_dir: str | Path) -> None:
    """Write ``benchmark_summary.md``, ``benchmark_reading.md``, ``sea_ad_epoch.md``,
    ``shift_transfer.md``."""
    text = Path(results_path).read_text(encoding="utf-8")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, body in (
        ("benchmark_summary.md", summary_markdown(text)),
        ("sea_ad_epoch.md", sea_ad_epoch_markdown(text)),
        ("benchmark_reading.md", reading_markdown(text)),
        ("shift_transfer.md", shift_markdown(text)),
    ):
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != body:
            path.write_text(body, encoding="utf-8")


if __name__ == "__main__":
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"
    text = results.read_text(encoding="utf-8")
    sys.stdout.write(
        summary_markdown(text) + "\n" + reading_markdown(text) + "\n" + sea_ad_epoch_markdown(text)
    )
