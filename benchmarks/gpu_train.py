"""Training-step throughput of the CellFM classifier on one device.

80M preset, bf16 autocast, batch 16, ``max_tokens`` 2048, synthetic cells with 2048 expressed
genes out of a 36,601-gene vocabulary (SEA-AD-like), default policy ``encoder+head`` (the
36,608 x 1536 gene table re-initialised and frozen). Warm-up steps, then timed steps; prints
cells/s, ms/step and peak GPU memory. Also times inference (forward only).

Usage::

    python benchmarks/gpu_train.py                      # on a GPU
    python benchmarks/gpu_train.py --preset tiny --steps 3 --warmup 1 --max-tokens 64 \
        --batch-size 4 --n-genes 500 --device cpu       # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cellfm_sc.data import TokenBatch
from cellfm_sc.model import CellFMClassifierModule
from cellfm_sc.nn import CellFMConfig, CellFMTrunk, apply_trainable


def synthetic_batch(batch_size: int, n_tokens: int, n_genes: int, n_classes: int, g) -> TokenBatch:
    ids = torch.stack(
        [torch.randperm(n_genes, generator=g)[:n_tokens] + 1 for _ in range(batch_size)]
    )
    ids, _ = ids.sort(dim=1)
    values = torch.log1p(torch.rand(batch_size, n_tokens, generator=g) * 20)
    return TokenBatch(
        values=values,
        gene_ids=ids,
        valid=torch.ones(batch_size, n_tokens, dtype=torch.bool),
        n_tokens=torch.full((batch_size,), n_tokens),
        obs_index=torch.arange(batch_size),
        labels=torch.randint(0, n_classes, (batch_size,), generator=g),
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="80M")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--n-genes", type=int, default=36601)
    p.add_argument("--n-classes", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--trainable", default="encoder+head")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    bf16 = (args.precision or ("bf16" if dev.type == "cuda" else "fp32")) == "bf16"
    g = torch.Generator().manual_seed(0)
    trunk = CellFMTrunk(CellFMConfig.from_preset(args.preset), n_genes=args.n_genes)
    trunk.gradient_checkpointing = args.gradient_checkpointing
    module = CellFMClassifierModule(trunk, args.n_classes).to(dev)
    summary = apply_trainable(module, args.trainable)
    opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=1e-4)
    batches = [
        synthetic_batch(args.batch_size, args.max_tokens, args.n_genes, args.n_classes, g).to(dev)
        for _ in range(4)
    ]
    ctx = (
        torch.autocast(dev.type, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(dev.type, enabled=False)
    )

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(b: TokenBatch) -> None:
        with ctx:
            out = module(b)
            loss = module.cell_loss(out.logits, b.labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in module.parameters() if q.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    module.train()
    for i in range(args.warmup):
        step(batches[i % 4])
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 4])
    sync()
    train_s = time.perf_counter() - t0
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")

    module.eval()
    with torch.inference_mode():
        for i in range(2):
            with ctx:
                module(batches[i % 4])
        sync()
        t0 = time.perf_counter()
        for i in range(args.steps):
            with ctx:
                module(batches[i % 4])
        sync()
        infer_s = time.perf_counter() - t0

    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "preset": args.preset,
        "precision": "bf16-mixed" if bf16 else "fp32",
        "batch_size": args.batch_size,
        "tokens_per_cell": args.max_tokens,
        "n_genes": args.n_genes,
        "trainable": str(summary),
        "gradient_checkpointing": args.gradient_checkpointing,
        "train_cells_per_s": args.batch_size * args.steps / train_s,
        "train_ms_per_step": 1000 * train_s / args.steps,
        "infer_cells_per_s": args.batch_size * args.steps / infer_s,
        "peak_gpu_mem_gib_train": peak_train,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
