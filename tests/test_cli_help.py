"""Every command's --help describes every option, with its default (units are in the text).

The parsers are captured from the real entry points (setup.cfg's console scripts and the benches'
``main``) just before they parse, so a new option without help fails here.
"""

from __future__ import annotations

import argparse
import configparser
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("bench/ingest.py", "bench/aggregation.py", "bench/demo.py")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def capture(main: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def parse_args(self: argparse.ArgumentParser, *a: object, **k: object) -> None:
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Captured) as got:
        main([])
    return got.value.parser


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    return dict((part.strip() for part in ln.split("=", 1)) for ln in lines)  # type: ignore[misc]


def bench_main(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(path).stem}", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main  # type: ignore[no-any-return]


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, parser, action


def problems(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    found = []
    for path, owner, action in walk(parser, prog):
        name = "/".join(action.option_strings) or action.dest
        if action.help in (None, "", argparse.SUPPRESS):
            found.append(f"{path} {name}: no help text")
            continue
        text = owner._get_formatter()._expand_help(action)
        default = action.default
        if action.option_strings and default not in (None, False, True, argparse.SUPPRESS) and not action.required:
            if str(default) not in text:
                found.append(f"{path} {name}: the help does not say its default {default!r}: {text!r}")
    return found


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_every_option_of_every_command_is_described(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, func = console_scripts()[script].split(":")
    parser = capture(getattr(importlib.import_module(module), func), monkeypatch)
    assert not problems(parser, script), "\n".join(problems(parser, script))


@pytest.mark.parametrize("path", BENCHES)
def test_every_option_of_every_bench_is_described(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = capture(bench_main(path), monkeypatch)
    assert not problems(parser, path), "\n".join(problems(parser, path))


def test_the_checker_catches_a_bare_option() -> None:
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers().add_parser("run")
    sub.add_argument("--rounds", type=int, default=5, help="rounds to run")
    sub.add_argument("--bare")
    assert problems(p, "x") == [
        "x run --rounds: the help does not say its default 5: 'rounds to run'",
        "x run --bare: no help text",
    ]
