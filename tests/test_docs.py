"""The commands the README and docs show run as written: every ``python -m MODULE ...`` (or ``torchrun ... -m
MODULE -- ...``) in a code span or block of README.md, results/README.md and docs/*.md names a command of ours,
and its parser accepts the options and values shown; for ``bench.adaptive`` its own checks of them
(``Run.from_args``: defence names, budgets, modes) pass too. Nothing runs beyond the parsing. A command written
with a placeholder (``<weights>``, ``...``, ``[--bf16]``, ``{fp32,bf16}``, ``$arch``, or an upper-case name such as
``T`` or ``CHECKPOINT`` standing for a value), a bare mention of a command's name, and the record of a command of
an older release (under a heading, in a paragraph or in a table row that says "superseded") are checked only for
their module."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

from bench.whitebox.config import Run

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"-m ((?:bench|purify|classifiers)\.[a-z_]+)((?:(?!&&|\|\||;|\|).)*)")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
PLACEHOLDER = re.compile(r"[<{$]|^\[|\.\.\.|^[A-Z][A-Z0-9_]*(\.[a-z]+)?$")


def code_spans(text: str):
    """(historical, code) for the lines of the fenced blocks (shell continuations joined) and the inline code spans
    (line breaks as spaces) of a Markdown text. Historical: the section's heading, or the inline span's paragraph or
    table row, says "superseded": the command of an older release, kept as the record of what ran."""
    prose = FENCE.sub(lambda block: re.sub(r"[^\n]", " ", block.group(0)), text)  # fences blanked, offsets kept

    def historical(position: int, inline: bool) -> bool:
        sections: dict[int, str] = {}  # the headings above the position, by level
        for hashes, title in re.findall(r"^(#+) (.*)$", prose[:position], re.M):
            sections = {level: t for level, t in sections.items() if level < len(hashes)} | {len(hashes): title}
        context = " ".join(sections.values())
        if inline:
            starts = [m.end() for m in re.finditer(r"\n\s*\n|\n(?=\|)", prose[:position])]
            end = re.search(r"\n\s*\n|\n(?=\|)", prose[position:])
            context += prose[starts[-1] if starts else 0:position + (end.start() if end else len(prose))]
        return "superseded" in context.lower()

    for block in FENCE.finditer(text):
        yield from ((historical(block.start(), False), line)
                    for line in block.group(1).replace("\\\n", " ").splitlines())
    for span in re.finditer(r"`([^`]+)`", prose):
        yield historical(span.start(), True), span.group(1).replace("\n", " ")


def documented_commands() -> list[tuple[str, str, list[str] | None]]:
    """(where, module, arguments) of every command in the docs; the arguments stop at a redirection, and are None
    where only the module is checked: a command of an older release, a placeholder, or a bare mention of the
    command's name."""
    commands = []
    for doc in DOCS:
        for historical, span in code_spans(doc.read_text()):
            for match in COMMAND.finditer(span):
                words = shlex.split(match.group(2), comments=True)
                words = words[1:] if words[:1] == ["--"] else words  # torchrun's separator
                words = words[:next((i for i, w in enumerate(words) if re.match(r"\d?>|&", w)), len(words))]
                checked = words and not historical and not any(PLACEHOLDER.search(word) for word in words)
                commands.append((doc.relative_to(ROOT).as_posix(), match.group(1), words if checked else None))
    return commands


class Parsed(Exception):
    """Raised in place of running a command once its arguments have parsed."""


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds the documented commands (a broken pattern would make the test below check nothing)."""
    modules = {module for _, module, _ in COMMANDS}
    checked = [words for _, _, words in COMMANDS if words is not None]
    assert len(COMMANDS) > 100 and len(checked) > 80
    assert {"bench.adaptive", "bench.transfer", "purify.train", "classifiers.train", "bench.quality"} <= modules


def test_every_documented_command_parses(monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parsed = parse(parser, args, namespace)
        if parser.prog == "python -m bench.adaptive":
            try:
                Run.from_args(parsed, list(args))
            except ValueError as err:
                parser.error(str(err))
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    refused = []
    for where, module, words in COMMANDS:
        command = importlib.import_module(module)  # a module that does not exist fails here
        if words is None:
            continue
        try:
            command.main(words)
        except Parsed:
            continue
        except SystemExit as stop:
            if stop.code == 0:  # --help
                continue
        refused.append(f"{where}: python -m {module} {shlex.join(words)}")
    assert not refused, "documented commands that their parser refuses:\n" + "\n".join(refused)
