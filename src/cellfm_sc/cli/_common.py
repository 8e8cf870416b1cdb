"""What every ``cellfm-sc`` command shares: argument types, the parser's voice, the console,
errors worded as flags, reading/writing files, and the output-directory transaction.

One import for the commands; the helpers live by concept in ``_console`` (the voice: program
name, :class:`CLIError`, flags in messages, help formatting, console, library noise),
``_args`` (argument types and shared option groups) and ``_files`` (input checks, ``.h5ad``
files, epoch checkpoints, :class:`RunDirectory`).

Imports nothing heavy (no torch, anndata, scvi-tools, Lightning) at import time.
"""

from __future__ import annotations

from cellfm_sc.cli._args import (
    add_command,
    add_hardware_args,
    add_keep_checkpoints,
    add_shared,
    device_type,
    devices_type,
    fraction_type,
    keep_checkpoints_type,
    label_order_type,
    lr_type,
    non_negative_float,
    non_negative_int,
    number_type,
    positive_float,
    positive_int,
    split_size,
)
from cellfm_sc.cli._console import (
    KEYWORD_FLAGS,
    NEGATABLE_FLAGS,
    PROG,
    CLIError,
    Console,
    Parser,
    data_errors,
    in_flags,
    message_of,
    one_line,
    quiet_libraries,
    show_progress,
    warnings_as_lines,
)
from cellfm_sc.cli._files import (
    RunDirectory,
    drop_scvi_bookkeeping,
    existing_dir,
    existing_file,
    newest_checkpoint,
    obs_only,
    print_outputs,
    read_h5ad,
    resume_checkpoint,
    writable_dir,
    writable_parent,
    write_split_h5ads,
)

__all__ = [
    "KEYWORD_FLAGS",
    "NEGATABLE_FLAGS",
    "PROG",
    "CLIError",
    "Console",
    "Parser",
    "RunDirectory",
    "add_command",
    "add_hardware_args",
    "add_keep_checkpoints",
    "add_shared",
    "data_errors",
    "device_type",
    "devices_type",
    "drop_scvi_bookkeeping",
    "existing_dir",
    "existing_file",
    "fraction_type",
    "in_flags",
    "keep_checkpoints_type",
    "label_order_type",
    "lr_type",
    "message_of",
    "newest_checkpoint",
    "non_negative_float",
    "non_negative_int",
    "number_type",
    "obs_only",
    "one_line",
    "positive_float",
    "positive_int",
    "print_outputs",
    "quiet_libraries",
    "read_h5ad",
    "resume_checkpoint",
    "show_progress",
    "split_size",
    "warnings_as_lines",
    "writable_dir",
    "writable_parent",
    "write_split_h5ads",
]
