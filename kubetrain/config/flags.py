"""Settings as command-line flags: one `--flag` per setting, named, typed and helped once.

Flag values stay strings (None when absent) until `RunConfig.from_flat` types
and checks them, so a flag and a pipeline parameter fail with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from kubetrain.config.settings import RunConfig, fields_of
from kubetrain.core.errors import KubetrainError


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_of(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    return (
        f"{f.metadata['help']}{' One of: ' + ', '.join(choices) + '.' if choices else ''}"
        f" (default: {f.default})"
    )


def add_argument(parser, f: dataclasses.Field, flag: str = "") -> None:
    """The `--flag` of one setting (named like the field with dashes unless `flag` is given)."""
    flag = flag or flag_of(f.name)
    if str(f.type) == "bool":
        parser.add_argument(
            flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_of(f)
        )
    else:
        parser.add_argument(
            flag, dest=f.name, type=str, default=None, metavar=str(f.type).upper(), help=help_of(f)
        )


def add_arguments(parser, *sections: str) -> None:
    """One `--flag` per setting of the given sections (all when none)."""
    for f in fields_of(*sections):
        add_argument(parser, f)


def given(args: argparse.Namespace, *sections: str) -> dict[str, Any]:
    """The settings flags actually passed (absent ones keep their defaults)."""
    return {
        f.name: getattr(args, f.name)
        for f in fields_of(*sections)
        if getattr(args, f.name, None) is not None
    }


def from_arguments(args: argparse.Namespace, *sections: str) -> RunConfig:
    return RunConfig.from_flat(given(args, *sections))


def json_object(text: str, flag: str) -> dict[str, Any]:
    """A JSON object given on the command line, with a one-line error naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KubetrainError(
            f"{flag} is not valid JSON ({exc.msg}); pass an object such as '{{\"width\": 64}}'"
        ) from None
    if not isinstance(value, dict):
        raise KubetrainError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value
