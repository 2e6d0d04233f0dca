"""How the guide's code blocks and their annotations are read (what test_guide.py runs)."""

from __future__ import annotations

from pathlib import Path

from tests.docs.blocks import blocks_of, expected_lines

PAGE = """# A page

Some text.

<!-- test: file app.py -->
```python
x = 1
```

<!-- test: nats acme -->
```sh
choreograph run &
```

<!-- test: expect -->
```text
order … shipped
```

An unannotated block, after text that ends the previous annotations:

```python
print("hi")
```
"""


def test_blocks_carry_the_annotations_right_above_them(tmp_path: Path) -> None:
    # given a page with annotated and plain blocks
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(PAGE)
    # when it is read
    blocks = blocks_of(page, tmp_path)
    # then each block has its language, code, line and own annotations only
    assert [(b.lang, b.notes) for b in blocks] == [
        ("python", ["file app.py"]),
        ("sh", ["nats acme"]),
        ("text", ["expect"]),
        ("python", []),
    ]
    assert blocks[0].code == "x = 1\n"
    assert blocks[0].note("file") == "app.py"
    assert blocks[1].note("nats") == "acme"
    assert blocks[2].note("expect") == ""
    assert blocks[3].note("expect") is None
    assert blocks[3].where == "docs/page.md:22"


def test_an_expected_line_matches_with_the_ellipsis_standing_for_anything(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(PAGE)
    (pattern,) = expected_lines(blocks_of(page, tmp_path)[2])
    assert pattern.search("2026 INFO order o-1 was shipped today")
    assert not pattern.search("order o-1 failed")
