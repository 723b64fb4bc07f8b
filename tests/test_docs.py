"""The manual in docs/ agrees with the code: the options tables list exactly the CLI's options, with
its choices and defaults, and the README's links point at pages that exist."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from beam_pipeline.run import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def option_rows() -> dict[str, tuple[str, str]]:
    """Every row of a docs table whose header starts with `| option |`: option -> (first cell, default cell)."""
    rows: dict[str, tuple[str, str]] = {}
    for page in sorted(DOCS.glob("*.md")):
        in_table = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("| option | default |"):
                in_table = True
                continue
            if not line.startswith("|"):
                in_table = False
            if not in_table or line.startswith("|---"):
                continue
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            for name in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                assert name not in rows, f"{name} is documented twice ({page.name})"
                rows[name] = (cells[0], cells[1])
    return rows


def parser_options() -> dict[str, argparse.Action]:
    return {action.option_strings[0]: action for action in cli.argument_parser()._actions
            if action.option_strings and action.option_strings[0] != "-h"}


def test_the_options_tables_list_every_option_of_the_parser_and_no_other():
    documented, parsed = set(option_rows()), set(parser_options())
    assert documented - parsed == set(), "documented but not an option"
    assert parsed - documented == set(), "an option missing from docs/options.md (or docs/dicomweb.md)"


def test_the_documented_choices_and_defaults_are_the_parsers():
    rows = option_rows()
    for name, action in parser_options().items():
        first, default = rows[name]
        if action.choices:
            listed = re.search(re.escape(name) + r" ([a-z|\\]+)`", first)
            assert listed, f"{name}: the table does not list its choices"
            assert listed.group(1).replace("\\", "").split("|") == list(action.choices), name
        value = action.default
        if value in (None, False, [], argparse.SUPPRESS):
            assert not default.startswith("`"), f"{name}: the table names a default, the parser has none"
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert default.startswith("`") and default.strip("`") == shown, f"{name}: table {default!r}, parser {shown!r}"


def test_the_help_names_every_documented_option():
    help_text = cli.argument_parser().format_help()
    for name in option_rows():
        assert re.search(re.escape(name) + r"\b", help_text), name


def test_the_readme_and_the_pages_link_to_pages_that_exist():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_manual_builds_with_mkdocs_strict(tmp_path):
    """A broken link or anchor, or a page missing from mkdocs.yml's nav, fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "options" / "index.html").exists()
