"""Turn an arguments dataclass into flags, as ms-swift spells them.

- `--flag value`, list flags take several values (`--dataset a.jsonl b.jsonl`),
  booleans take true/false (`--packing true`);
- a YAML or JSON file may stand in for flags (`swiftray sft cfg.yaml`), flags
  given beside it win;
- an unknown flag fails at once, naming the closest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from swiftray.arguments import ArgumentError


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) for `X`, `X | None`, `list[X]`, `list[X] | None`."""
    if isinstance(tp, str):
        raise TypeError(f"unresolved annotation {tp!r}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(inner[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: Any):
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return tp
    return str


def _defaults_repr(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "[]"
    return str(value)


def build_parser(cls: type, prog: str) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """An argparse parser for `cls`, and the map from every accepted flag to its field name."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [config.yaml] [--flag value ...]",
        description=(cls.__doc__ or "").strip(),
    )
    parser.add_argument("config", nargs="?", help="optional YAML/JSON file holding flags")
    flag_to_field: dict[str, str] = {}
    for f in sorted(fields(cls), key=lambda f: f.name):
        inner, is_list = _unwrap(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        names = [f"--{f.name}", *f.metadata.get("aliases", [])]
        for name in names:
            flag_to_field[name] = f.name
        help_text = f"{f.metadata.get('help', '')} (default: {_defaults_repr(default)})"
        parser.add_argument(
            *names, dest=f.name, type=_converter(inner), nargs="+" if is_list else None,
            default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper() if not is_list else "V",
        )
    return parser, flag_to_field


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ArgumentError(f"config file {path}: not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - both parsers raise their own types
        kind = "YAML" if path.endswith(("yaml", "yml")) else "JSON"
        raise ArgumentError(f"config file {path}: not valid {kind}: {_one_line_parse_error(err)}") from err
    if not isinstance(data, dict):
        raise ArgumentError(f"config file {path}: expected a mapping of flag names to values")
    return data


def _one_line_parse_error(err: Exception) -> str:
    """YAML's messages span lines (the offending text, a caret): keep where and what."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type."""
    inner, is_list = _unwrap(typing.get_type_hints(cls)[name])
    if value is None:
        return None
    convert = _converter(inner)
    try:
        if is_list:
            items = value if isinstance(value, list) else [value]
            return [convert(v) if not isinstance(v, inner) else v for v in items]
        if isinstance(value, inner) and not (inner is int and isinstance(value, bool)):
            return value
        if name == "columns" and isinstance(value, dict):
            return json.dumps(value)
        return convert(value)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ArgumentError(f"{source}: field {name!r}: {err}") from err


def parse_args(cls: type, argv: list[str], prog: str = "swiftray") -> Any:
    """Parse `argv` into a finalized `cls` instance."""
    parser, flag_to_field = build_parser(cls, prog)
    argv = [str(a) for a in argv]  # Python callers may pass numbers
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        bare = flag.split("=", 1)[0]
        close = difflib.get_close_matches(bare, list(flag_to_field), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; see `{prog} --help`"
        parser.error(f"unknown flag {bare}{hint}" if bare.startswith("-") else f"unexpected value {bare!r}{hint}")
    values = vars(known)
    config_path = values.pop("config", None)
    merged: dict[str, Any] = {}
    if config_path:
        valid = {f.name for f in fields(cls)}
        aliases = {k.lstrip("-"): v for k, v in flag_to_field.items()}
        for key, value in load_config_file(config_path).items():
            name = aliases.get(key.lstrip("-"))
            if name is None or name not in valid:
                close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ArgumentError(f"config file {config_path}: unknown field {key!r}{hint}")
            merged[name] = _coerce(cls, name, value, f"config file {config_path}")
    merged.update(values)
    return cls(**merged).finalize()
