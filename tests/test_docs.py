"""The project documents itself: nothing in the repository points outside it, and its links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# The project's private planning folder and its documents, which users of the project do not have
# (spelled so that this file does not match itself).
OUTSIDE = re.compile(r"\.\./shar[e]d|\b(?:METHOD|ARCHITECTURE)\.md\b")


def tracked(suffixes: tuple[str, ...]) -> list[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / f for f in files.splitlines() if f.endswith(suffixes) and (REPO / f).is_file()]


def test_no_file_points_outside_the_repository():
    for path in tracked((".py", ".md", ".yaml", ".toml", "Makefile", ".sh", ".txt")):
        assert not OUTSIDE.search(path.read_text(errors="replace")), path


def test_markdown_links_resolve_inside_the_repository():
    for doc in tracked((".md",)):
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto, data
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{doc.relative_to(REPO)}: {target}"


# --- the docs site, the front page and the commands the docs show (issue 42) -----------------------------------

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:make|python3?|torchrun|bash|pip|git|hf|docker|tritonserver|tensorboard)\s[^`]*)`")
# Other tools' commands the docs show (installing, fetching weights, NVIDIA's server and container, TensorBoard):
# their own CLIs, not this project's.
EXTERNAL = {"pip", "git", "hf", "docker", "tritonserver", "tensorboard"}


def reference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shown_commands() -> list[tuple[str, str]]:
    """(file, command) for every shell command of the README and docs/: each line of a bash block (continuations
    joined, comments cut) and each inline code span that starts with a command."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for language, block in FENCED.findall(text):
            if language in ("bash", "sh", "shell"):
                for line in block.replace("\\\n", " ").splitlines():
                    if command := re.sub(r"\s+#.*$", "", line).strip():
                        found.append((doc.name, command))
        for command in INLINE.findall(FENCED.sub("", text)):
            found.append((doc.name, command.strip()))
    return found


def make_modules() -> dict[str, str | None]:
    """Each make target and the `python -m` module its ARGS go to (None: it takes none)."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if m := re.match(r"^([a-z][\w-]*):", line):
            current = m[1]
            targets[current] = None
        elif not line.startswith("\t"):  # a variable, a comment, another rule: the recipe has ended
            current = None
        elif current and targets[current] is None and "$(ARGS)" in line and (m := re.search(r"-m ([\w.]+)", line)):
            targets[current] = m[1]
    return targets


def config_key(key: str) -> bool:
    """Whether `a.b.c` names a field of the config schema."""
    import dataclasses

    from train.config import Config

    node = Config()
    for part in key.split("."):
        names = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
        if part not in names:
            return False
        node = getattr(node, part)
    return True


def problems_of(command: str, parsers, targets: dict) -> list[str]:
    """What in a shown command its parser (or the Makefile, or the config schema) does not know."""
    tokens = command.replace('"', " ").replace("'", " ").split()
    if tokens[0] == "make":
        target, module = tokens[1], targets.get(tokens[1], "missing")
        if module == "missing":
            return [f"make {target}: no such target"]
        args = [t for t in tokens[2:] if not re.match(r"^[A-Z]+=", t)]
        args = [a for t in tokens[2:] if t.startswith("ARGS=") for a in [t[5:]]] + args
        return problems_of(f"python -m {module} {' '.join(args)}", parsers, targets) if module else []
    if tokens[0] == "bash":
        phases = re.search(r"unknown phase .*?\((.*?)\)", (REPO / "benchmarks/gpu.sh").read_text())[1].split(", ")
        return [f"gpu.sh: unknown phase {p}" for p in tokens[3:] if p.isalpha() and p not in phases and p != "OUT"]
    if tokens[0] in ("python", "python3") and "-m" not in tokens:  # a script of the repository
        return [] if tokens[1].endswith(".py") and (REPO / tokens[1]).is_file() else [f"no script {tokens[1]}"]
    if tokens[0] in ("python", "python3", "torchrun"):
        module = tokens[tokens.index("-m") + 1]
        rest = tokens[tokens.index("-m") + 2 :]
        if module not in reference().COMMANDS:
            return [f"python -m {module}: not one of the project's commands (docs/reference.py COMMANDS)"]
        known = {o for a in parsers(module)._actions for o in a.option_strings}
        flags = [t.split("=")[0] for t in rest if t.startswith("--")]
        out = [f"{module}: no flag {flag}" for flag in flags if flag not in known]
        overrides = [t.split("=")[0] for t in rest if re.match(r"^[a-z_]+(\.[a-z_0-9]+)+=", t)]
        if module in ("train", "benchmarks.ablation", "benchmarks.train_speed", "train.data.check"):
            out += [f"{module}: no config field {k}" for k in overrides if not config_key(k)]
        configs = [t for t in rest if re.match(r"^configs/[\w-]+\.yaml$", t)]
        out += [f"{module}: no file {c}" for c in configs if not (REPO / c).is_file()]
        return out
    return [] if tokens[0] in EXTERNAL else [f"not a command the docs may show: {tokens[0]}"]


def test_every_command_the_docs_show_is_known_to_its_parser():
    """Each `make` target exists and its ARGS are flags of the command it runs; each `python -m` command's flags
    are its parser's, its `a.b=c` overrides fields of the config schema, its configs files on disk; each GPU
    script phase exists. Other tools' commands are theirs (EXTERNAL)."""
    from functools import cache

    parsers, targets = cache(reference().parser_of), make_modules()
    commands = shown_commands()
    assert len(commands) > 100  # the extraction finds the docs' commands
    problems = [f"{doc}: `{command}`: {p}" for doc, command in commands for p in problems_of(command, parsers, targets)]
    assert problems == [], "\n".join(problems)


def test_a_wrong_flag_a_wrong_field_and_a_missing_target_are_found():
    from functools import cache

    parsers, targets = cache(reference().parser_of), make_modules()
    assert problems_of("python -m export --run runs/x --variant fp16", parsers, targets) == [
        "export: no flag --variant"
    ]
    assert problems_of('make train ARGS="method.preset=full method.lerners=vit"', parsers, targets) == [
        "train: no config field method.lerners"
    ]
    assert problems_of("make deploy RUN=runs/x", parsers, targets) == ["make deploy: no such target"]
    assert problems_of("bash benchmarks/gpu.sh OUT warp", parsers, targets) == ["gpu.sh: unknown phase warp"]


def test_the_reference_page_is_what_the_code_generates():
    assert (REPO / "docs/reference.md").read_text() == reference().generate(), "run: python docs/reference.py"


def test_the_front_page_is_short_and_its_numbers_are_in_the_files_it_names():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    rows = [r for r in readme.split("## Headline numbers")[1].split("\n## ")[0].splitlines() if r.startswith("| ")]
    checked = 0
    for row in rows[1:]:
        what, number, source = (c.strip() for c in row.strip("|").split("|"))
        if source == "source":
            continue
        text = (REPO / source.strip("`")).read_text()
        for value in re.findall(r"[−-]?\d+(?:\.\d+)?(?: min \d+ s)?×?", number):
            assert re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])", text), f"{value} ({what}) not in {source}"
            checked += 1
    assert checked >= 10


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
