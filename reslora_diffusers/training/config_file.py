"""`--config FILE`: any flag of a command line, kept in a TOML, YAML or JSON file; flags given on the command line
override the file.

    # train.toml (keys are the flag names without "--"; tables only group them, as in kohya's config files)
    pretrained_model_name_or_path = "assets/tiny-emoji-sd"
    [data]
    train_data_dir = "my_images"
    enable_bucket = true
    [training]
    learning_rate = 1e-4
    validation_prompt = ["a cat", "a dog"]

The file's settings become command-line tokens placed before the real ones, so argparse checks their types and
choices as usual and a later (command-line) value wins. A switch (`enable_bucket = true`) can be turned on in
the file but not off on the command line. An unknown key is an error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import tomllib

from reslora_diffusers.cli import first_line

SKIPPED = {"help", "config", "local_rank", "hub_token"}  # never read from, nor saved to, a config file


def read_settings(path: Path) -> dict:
    """The file's settings as one flat mapping (tables / sections merged); ValueError with a one-line reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read config file {path}: {error}") from None
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # pyyaml: a dependency of accelerate

            data = yaml.safe_load(text) or {}
    except Exception as error:  # tomllib, yaml and json each raise their own error types
        raise ValueError(f"{path} is not valid {suffix[1:].upper()}: {first_line(error)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a table of settings, got {type(data).__name__}")
    settings: dict = {}
    for key, value in data.items():
        section = value if isinstance(value, dict) else {key: value}
        for name, item in section.items():
            name = str(name).replace("-", "_")
            if name in settings:
                raise ValueError(f"{path}: {name!r} is set twice")
            settings[name] = item
    return settings


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest not in SKIPPED}


def settings_to_tokens(parser: argparse.ArgumentParser, settings: dict, path: Path) -> list[str]:
    """Command-line tokens for the settings; calls `parser.error` on an unknown key or a value of the wrong kind."""
    actions = _flag_actions(parser)
    tokens: list[str] = []
    for name, value in settings.items():
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, actions, n=1)
            parser.error(f"{path}: unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else " (not a flag of this script)"))
        flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        if value is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                parser.error(f"{path}: {name} is a switch and takes true or false, got {value!r}")
            tokens += [flag] if value == action.const else []
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            values = value if isinstance(value, list) else [value]
            tokens += [flag, *(str(v) for v in values)]
        elif isinstance(value, (list, dict, bool)):
            parser.error(f"{path}: {name} takes one value, got {value!r}")
        else:
            tokens.append(f"{flag}={value}")
    return tokens


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with `--config FILE` read first. The parsed flags as given (file and command line
    merged, before any defaulting the caller does) are kept in `args.resolved_config`, ready to save."""
    if not any(action.dest == "config" for action in parser._actions):
        parser.add_argument(
            "--config", type=str, default=None,
            help="A TOML (or YAML / JSON) file of flag settings (names without '--'); command-line flags override it.",
        )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    tokens = []
    if known.config is not None:
        path = Path(known.config)
        try:
            settings = read_settings(path)
        except ValueError as error:
            parser.error(str(error))
        tokens = settings_to_tokens(parser, settings, path)
    args = parser.parse_args(tokens + list(sys.argv[1:] if argv is None else argv))
    args.resolved_config = {name: getattr(args, name) for name in _flag_actions(parser)}
    return args
