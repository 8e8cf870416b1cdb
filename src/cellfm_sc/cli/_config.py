"""``--config`` files (TOML, YAML or JSON): options under the flags given on the command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellfm_sc.cli._console import CLIError, one_line
from cellfm_sc.cli._files import existing_file


def _load_config_file(path: Path, command: str) -> dict[str, Any]:
    text_suffix = path.suffix.lower()
    try:
        if text_suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise CLIError(
                        "reading a TOML --config on Python 3.10 needs tomli: pip install tomli"
                    ) from None
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif text_suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise CLIError("reading a YAML --config needs PyYAML: pip install pyyaml") from None
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        elif text_suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise CLIError(f"--config must be a .toml, .yaml/.yml or .json file, got {path.name}")
    except CLIError:
        raise
    except Exception as exc:  # parse errors of any of the three formats
        raise CLIError(f"cannot parse --config {path}: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a table of options, got {type(data).__name__}")
    if isinstance(data.get(command), dict):
        data = data[command]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, Any]:
    """Merge a ``--config`` file under the flags given; return the file's values."""
    sub = _subparser(parser, args.command)
    path = existing_file(args.config, "--config file")
    values = _load_config_file(path, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise CLIError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(actions)}")
    given = _dests_given(sub, argv)
    for key, value in values.items():
        action = actions[key]
        value = _convert_config_value(action, key, value, path)
        if key not in given:
            setattr(args, key, value)
    return values


def _convert_config_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    where = f"--config {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if key in ("label_order", "devices") and isinstance(value, list):
        value = ",".join(map(str, value))
    if action.type is not None:
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where}: {value!r} is not one of {list(action.choices)}")
    return value


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _dests_given(sub: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options that appear on the command line (positionals included)."""
    given: set[str] = set()
    flags = {}
    for action in sub._actions:
        for opt in action.option_strings:
            flags[opt] = action.dest
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name in flags:
            given.add(flags[name])
        elif name.startswith("--"):
            # unique prefix abbreviations, as argparse accepts them
            hits = {d for f, d in flags.items() if f.startswith(name)}
            if len(hits) == 1:
                given |= hits
    return given
