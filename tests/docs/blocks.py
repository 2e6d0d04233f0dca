"""The fenced code blocks of the guide's pages, with the annotations that say how to run them.

A block is annotated by HTML comments right above its fence (invisible on the site)::

    <!-- test: file shop.py -->      python: append to shop.py in the page's directory (importable)
    <!-- test: pytest test_x.py -->  python: a test file, run by pytest in a subprocess
    <!-- test: nats -->              needs the NATS server; runs only in the page's NATS variant
    <!-- test: nats acme -->         the same, and the block's namespace ``acme`` is the test's
    <!-- test: expect -->            text: lines the previous sh block must print (… = anything)
    <!-- test: envelope -->          json: a CloudEvent that choreograph must decode
    <!-- test: excerpt PATH -->      any language: the block is a verbatim part of the file PATH,
                                     which a test runs (e.g. the Node.js participant)

Unannotated ``python`` blocks run in order in one module per page; ``sh`` blocks run with bash
in the page's directory. A block of any other kind, or unannotated, is an error: every block of
the guide runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_FENCE = re.compile(r"^(\s*)(```+)\s*([\w-]*)(.*)$")
_NOTE = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    notes: list[str] = field(default_factory=list)

    def note(self, word: str) -> str | None:
        """The argument of annotation ``word`` ('' when it has none), or None when absent."""
        for note in self.notes:
            head, _, rest = note.partition(" ")
            if head == word:
                return rest.strip()
        return None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path, root: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    notes: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        note = _NOTE.match(line.strip())
        if note:
            notes.append(note.group(1))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if line.strip():
                notes = []
            i += 1
            continue
        indent, ticks, lang = fence.group(1), fence.group(2), fence.group(3)
        body: list[str] = []
        start = i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            text = lines[i]
            body.append(text[len(indent) :] if text.startswith(indent) else text)
            i += 1
        i += 1
        found.append(Block(str(path.relative_to(root)), start, lang, "\n".join(body) + "\n", notes))
        notes = []
    return found


def expected_lines(block: Block) -> list[re.Pattern[str]]:
    """Each line of an ``expect`` block as a pattern; ``…`` stands for anything."""
    return [
        re.compile(".*".join(re.escape(part) for part in line.strip().split("…")))
        for line in block.code.splitlines()
        if line.strip()
    ]
