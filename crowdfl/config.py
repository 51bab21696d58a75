"""Role configuration: one TOML file per role plus environment overrides.

A role's configuration is a tree of frozen dataclasses. ``load_config(AgentConfig, path,
"CROWDFL_AGENT")`` reads the file, then applies variables such as
``CROWDFL_AGENT__MQTT__PORT=8883`` (double underscore between levels), then checks every value
against the field's type. Unknown keys and wrong types are errors naming the key: a typo in a
config file must not be silently ignored on a device nobody watches.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (NVIDIA JetPack 6): the same parser, from PyPI
    import tomli as tomllib

C = TypeVar("C")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError("bad_type", f"{key}: expected a table")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError("bad_type", f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError("bad_type", f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError("bad_type", f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError("bad_type", f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError("bad_type", f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError("bad_type", f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError("bad_type", f"{key}: expected a path, got {value!r}")
        return Path(value)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError("bad_type", f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError("bad_type", f"{key}: unsupported field type {tp!r}")


def _build(cls: type[C], data: Mapping[str, Any], prefix: str) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError("unknown_key", f"{prefix or 'config'}: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("invalid", f"{prefix or 'config'}: {exc}") from None
    return obj


def _merge(base: dict[str, Any], path: list[str], value: str) -> None:
    node = base
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError("bad_override", f"{'.'.join(path)}: {part} is not a table")
        node = nxt
    node[path[-1]] = value


def load_config(
    cls: type[C],
    path: Path | None = None,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` from a TOML file (optional) and ``{env_prefix}__A__B`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("missing_file", f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("bad_toml", f"{path}: {exc}") from None
    if env_prefix:
        env = os.environ if environ is None else environ
        marker = env_prefix + "__"
        for key, value in sorted(env.items()):
            if key.startswith(marker):
                _merge(data, [p.lower() for p in key[len(marker) :].split("__")], value)
    return _build(cls, data, "")
