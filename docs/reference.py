"""The reference of every config field and command-line flag, generated from the code: the config dataclasses
(with the comments beside their fields) and the argparse parser of every command.

python docs/reference.py            # writes docs/reference.md (make docs does this first)
python docs/reference.py --check    # exit 1 when docs/reference.md is not what the code generates

`parser_of(module)` is also what tests/test_docs.py checks the commands shown in the docs against.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import re
import sys
import tokenize
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "reference.md"
# Every command of the project, as users type it after `python -m`, in pipeline order.
COMMANDS = [
    "train",
    "train.evaluate",
    "train.data.check",
    "train.data.synthetic",
    "train.data.complementary",
    "export",
    "export.tensorrt",
    "export.triton",
    "serve",
    "serve.predict",
    "serve.triton_server",
    "benchmarks.bench",
    "benchmarks.ablation",
    "benchmarks.gate",
    "benchmarks.train_speed",
    "benchmarks.load",
    "benchmarks.soak",
    "benchmarks.slide_batching",
    "benchmarks.evaluate",
    "benchmarks.precision",
    "benchmarks.overlays",
    "benchmarks.ort_cuda",
    "benchmarks.bf16_bisect",
    "benchmarks.gpu_check",
]


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser `python -m <command>` builds: its `main` runs until it parses, which raises instead."""
    module = importlib.import_module(command)
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{command}.__main__")
    names = ("parse_args", "parse_intermixed_args", "parse_known_args", "parse_known_intermixed_args")
    saved = {n: getattr(argparse.ArgumentParser, n) for n in names}

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    try:
        for name in names:
            setattr(argparse.ArgumentParser, name, caught)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            module.main(["--help"])
    except _Parsed as parsed:
        return parsed.parser
    finally:
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    raise RuntimeError(f"python -m {command}: its main() returned without parsing its arguments")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def command_section(command: str) -> list[str]:
    parser = parser_of(command)
    summary = (parser.description or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"### `python -m {command}`", "", summary, "", "| argument | default | what |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}" if not isinstance(action.metavar, tuple) else ""
        default = "" if action.default in (None, argparse.SUPPRESS, False) else f"`{action.default}`"
        what = action.help or ""
        if action.choices and not what.startswith("one of"):
            what = (what + "; " if what else "") + "one of " + ", ".join(f"`{c}`" for c in action.choices)
        lines.append(f"| {_cell(name)} | {_cell(default)} | {_cell(what)} |")
    return [*lines, ""]


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's comment: the one on its line, else the comment lines just above it."""
    source = inspect.getsource(cls)
    comments, above, line_of = {}, [], {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line_of.setdefault(token.start[0], token.string.lstrip("# ").strip())
    for number, line in enumerate(source.splitlines(), 1):
        match = re.match(r"\s+(\w+): ", line)
        if line.strip().startswith("#"):
            above.append(line_of.get(number, ""))
            continue
        if match and not line.strip().startswith(("def ", "return")):
            text = line_of.get(number) or " ".join(above)
            comments.setdefault(match[1], text)
        above = []
    return comments


def _type_name(hint: object) -> str:
    text = str(hint).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text)


def config_rows(cls: type, default: object, prefix: str) -> list[str]:
    rows, hints, comments = [], typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_rows(type(value), value, f"{prefix}{f.name}.")
            continue
        cells = [f"`{prefix}{f.name}`", _type_name(hints[f.name]), f"`{'null' if value is None else value}`"]
        rows.append("| " + " | ".join(_cell(c) for c in [*cells, comments.get(f.name, "")]) + " |")
    return rows


def config_section() -> list[str]:
    from train.config import Config

    head = ["| field | type | default | what |", "|---|---|---|---|"]
    lines = [
        "## Config fields",
        "",
        "Every field of a config file (`configs/*.yaml`), as `section.field=value` on the command line; the "
        "`cnn` and `vit` sections start from their own student's defaults (below). The resolved config is written "
        "to each run dir as `config.yaml`.",
        "",
        *head,
        *config_rows(Config, Config(), ""),
        "",
    ]
    return lines


def generate() -> str:
    lines = [
        "# Reference",
        "",
        "Generated by `python docs/reference.py` from the code (the config dataclasses in `train/config.py` and the "
        "argparse parser of every command); a test fails when this page and the code differ.",
        "",
        *config_section(),
        "## Commands",
        "",
        "The `make` targets of [getting started](index.md) run these.",
        "",
    ]
    for command in COMMANDS:
        lines += command_section(command)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    text = generate()
    if sys.argv[1:] == ["--check"]:
        sys.exit(
            0 if OUT.read_text() == text else f"{OUT} is not what the code generates: run python docs/reference.py"
        )
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
