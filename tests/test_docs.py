"""The project documents itself: nothing in the repository points outside it, and its links resolve."""

from __future__ import annotations

import re
import subprocess
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
