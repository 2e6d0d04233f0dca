"""The README's shortest example is examples/hello.py, and it works as the README says."""

from __future__ import annotations

import re
from pathlib import Path

from choreograph.testing import Harness
from examples.hello import Ping, Pong, app

ROOT = Path(__file__).resolve().parents[2]


def code_lines(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if line.strip() and not line.startswith(('"""', "#"))
    ]


def test_the_readme_shows_examples_hello_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n# examples/hello.py\n(.*?)```", readme, re.S)
    assert block is not None
    assert code_lines(block.group(1)) == code_lines((ROOT / "examples/hello.py").read_text())


async def test_ping_gets_its_pong_back() -> None:
    async with Harness(app) as h:
        await h.publish(Ping(text="hi"), correlation_id="t1")
        pong = await h.wait_for(Pong, correlation_id="t1")
        assert pong.data == {"text": "HI"}
