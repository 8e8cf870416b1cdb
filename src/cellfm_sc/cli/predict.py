"""``cellfm-sc predict`` and ``cellfm-sc embed``: apply a saved model to an ``.h5ad`` file."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from cellfm_sc.cli._args import Command, add_shared, device_type, fraction_type
from cellfm_sc.cli._console import CLIError, Console, quiet_libraries, show_progress
from cellfm_sc.cli._files import (
    drop_scvi_bookkeeping,
    existing_dir,
    existing_file,
    read_h5ad,
    without_scvi,
    writable_parent,
)
from cellfm_sc.cli._precheck import check_data_columns, check_hardware, read_header

__all__ = ["EMBED", "PREDICT", "run_embed", "run_predict"]


def _add_options(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments and options of ``predict`` or ``embed`` (``name``)."""
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model (OUT/model of finetune)")
    p.add_argument("data", metavar="DATA.h5ad", help="input AnnData (.h5ad)")
    p.add_argument(
        "--output",
        "-o",
        metavar="OUT",
        required=True,
        help="output file: OUT.h5ad, or an OUT.zarr folder"
        + (" (with --backed)" if name == "predict" else ""),
    )
    add_shared(p, "--batch-size", default=64)
    if name == "predict":
        p.add_argument(
            "--key-added",
            default="cellfm",
            help="prefix of the obs/obsm keys written",
        )
    p.add_argument(
        "--layer",
        help="adata.layers key holding raw counts (default: as the model was set up)",
    )
    p.add_argument(
        "--use-raw",
        action=argparse.BooleanOptionalAction,
        help="--use-raw reads the counts from adata.raw.X (the CELLxGENE layout), "
        "--no-use-raw from adata.X (default: where the model's training data had them)",
    )
    p.add_argument(
        "--min-gene-coverage",
        metavar="F",
        type=fraction_type,
        default=0.5,
        help="least fraction of the model's genes DATA must hold (query data may hold "
        "another gene set; missing genes count as not expressed)",
    )
    p.add_argument(
        "--device",
        default="auto",
        type=device_type,
        help="torch device: auto (a GPU when there is one), cpu, cuda, cuda:1, mps",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage type of the embedding written to the output (float16 halves it)",
    )
    add_shared(
        p,
        "--num-workers",
        help="data-loader worker processes reading and tokenising ahead of the model",
    )
    p.add_argument(
        "--backed",
        action="store_true",
        help="read DATA.h5ad backed (the count matrix stays on disk); the output then "
        "holds obs, obsm and uns only, never a copy of the counts",
    )


def _load(args: argparse.Namespace, con: Console) -> tuple[Any, Any, Path]:
    model_dir = existing_dir(args.model_dir, "model directory")
    data = existing_file(args.data, "data file")
    output = writable_parent(args.output, "--output")
    streamed = args.command == "embed" or args.backed
    if output.suffix not in ((".h5ad", ".zarr") if streamed else (".h5ad",)):
        raise CLIError(f"--output must end in .h5ad{' or .zarr' if streamed else ''}, got {output}")
    if not (model_dir / "model.pt").is_file():
        raise CLIError(
            f"{model_dir} is not a saved cellfm-sc model (no model.pt); pass OUT/model of "
            "'cellfm-sc finetune'"
        )
    # header checks: where the model reads its counts by default is known only once it loads
    check_data_columns(read_header(data), layer=args.layer, use_raw=bool(args.use_raw))
    check_hardware(device=args.device)
    quiet_libraries(args.quiet)
    con.info(f"reading {data}" + (" (backed)" if args.backed else ""))
    adata = read_h5ad(data, backed=args.backed)
    from cellfm_sc.model import CellFMClassifier

    con.info(f"loading the model from {model_dir}")
    model = CellFMClassifier.load(
        str(model_dir), adata=adata, layer=args.layer, use_raw=args.use_raw
    )
    return model, adata, output


def run_predict(args: argparse.Namespace, con: Console) -> int:
    from cellfm_sc._atomic import write_h5ad_atomic
    from cellfm_sc._stores import output_store

    model, adata, output = _load(args, con)
    k = args.key_added
    kwargs = dict(
        key_added=k,
        batch_size=args.batch_size,
        device=args.device,
        enable_progress_bar=show_progress(args),
        min_gene_coverage=args.min_gene_coverage,
    )
    if args.backed:  # never copy the counts of a backed file; stream the embedding
        with output_store(output, without_scvi(adata.obs)) as store:
            width = model.module.trunk.config.enc_dims
            model.annotate(adata, embedding_out=store.dense(f"X_{k}", width, args.dtype), **kwargs)
            store.write("obs", without_scvi(adata.obs))
            store.write(f"obsm/{k}_probabilities", adata.obsm[f"{k}_probabilities"])
            store.write("uns", {k: adata.uns[k]})
    else:
        model.annotate(adata, **kwargs)
        drop_scvi_bookkeeping(adata)
        if args.dtype == "float16":
            adata.obsm[f"X_{k}"] = adata.obsm[f"X_{k}"].astype("float16")
        write_h5ad_atomic(adata, output)
    counts = adata.obs[f"{k}_prediction"].value_counts()
    con.result(f"annotated {adata.n_obs:,} cells -> {output}")
    con.result(
        f"  obs['{k}_prediction'], obs['{k}_confidence'], obs['{k}_split'], "
        f"obsm['{k}_probabilities'], obsm['X_{k}']"
    )
    con.result("  predicted: " + ", ".join(f"{lab} {n:,}" for lab, n in counts.items() if n > 0))
    return 0


def run_embed(args: argparse.Namespace, con: Console) -> int:
    from cellfm_sc._stores import output_store

    model, adata, output = _load(args, con)
    width = model.module.trunk.config.enc_dims
    with output_store(output, without_scvi(adata.obs)) as store:
        model.get_latent_representation(
            adata,
            batch_size=args.batch_size,
            device=args.device,
            enable_progress_bar=show_progress(args),
            min_gene_coverage=args.min_gene_coverage,
            out=store.dense("X_cellfm", width, args.dtype),
            num_workers=args.num_workers,
        )
    con.result(
        f"embedded {adata.n_obs:,} cells -> {output}: obsm['X_cellfm'] ({adata.n_obs}, {width}) "
        f"{args.dtype}"
    )
    return 0


PREDICT = Command(
    "predict",
    "annotate an .h5ad file with a fine-tuned model",
    "Add obs['<key>_prediction'], obs['<key>_confidence'], obs['<key>_split'], "
    "obsm['<key>_probabilities'] and obsm['X_<key>'] to DATA.h5ad and write the "
    "result to --output (atomically; with --backed without the count matrix). "
    "DATA may be query data: its labels column is not read, and another gene set "
    "works (genes the model does not know are dropped; the model's genes missing "
    "from DATA count as not expressed).",
    functools.partial(_add_options, name="predict"),
    run_predict,
)
EMBED = Command(
    "embed",
    "write the CellFM cell embedding of an .h5ad file",
    "Write obs and obsm['X_cellfm'] (the cls embedding) of DATA.h5ad to --output; "
    "the output holds no count matrix.",
    functools.partial(_add_options, name="embed"),
    run_embed,
)
