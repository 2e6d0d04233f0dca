"""The README's shortest example is examples/hello.py, and it works as the README says."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from choreograph.testing import Harness
from choreograph.transport import DEFAULT_TRANSPORT_URL
from examples.hello import Ping, Pong, app
from tests.support.procs import wait_until

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


def readme_hello_commands() -> tuple[str, str]:
    """The README's two shell lines that run the hello example: the services, then a publish."""
    readme = (ROOT / "README.md").read_text()
    pattern = r"```sh\n(\S*choreograph run --app examples\.hello:app &.*?)```"
    block = re.search(pattern, readme, re.S)
    assert block is not None, "the README no longer shows how to run examples/hello.py"
    run, publish = [line for line in block.group(1).splitlines() if not line.startswith("#")]
    return run, publish


@pytest.mark.slow
@pytest.mark.timeout(900)  # 40 interpreter starts: minutes on a loaded machine, not a hang
def test_the_readme_hello_flow_delivers_its_event_twenty_times_out_of_twenty(
    tmp_path: Path,
) -> None:
    # Given the README's commands, run literally in a fresh directory each time (fresh bus), where
    # `.venv` and `examples` are the repository's
    run, publish = readme_hello_commands()
    delivered = 0
    for attempt in range(20):
        workdir = tmp_path / f"run{attempt}"
        workdir.mkdir()
        (workdir / ".venv").symlink_to(Path(sys.executable).parents[1])
        (workdir / "examples").symlink_to(ROOT / "examples")
        output = workdir / "out.txt"
        # When a shell runs the two lines as the README shows them (the services in the
        # background, the publish right away)
        script = f"{run}\n{publish}\necho $! > run.pid\n"
        with output.open("wb") as out:
            subprocess.run(
                ["bash", "-c", script], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                check=True, timeout=120,
            )  # fmt: skip
        pid = int((workdir / "run.pid").read_text())
        try:
            # Then the services print the answer: the event was kept for them
            wait_until(lambda out=output: "ping got 'HI'" in out.read_text(), 60, "ping's answer")
            delivered += 1
        finally:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda pid=pid: not _alive(pid), 30, "choreograph run to stop")
    assert delivered == 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A stopped child of the exited shell may linger as a zombie until it is reaped.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_the_readme_example_passes_lint() -> None:
    # Given the README's example app; when linted; then it has no error
    from choreograph.observe.lint import lint

    assert [f.code for f in lint(app) if f.severity == "error"] == []


def test_the_readme_names_the_real_default_bus() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"`{DEFAULT_TRANSPORT_URL}` (default)" in readme


def test_every_readme_recipe_can_find_the_choreograph_command() -> None:
    # Given the README's shell blocks; then each one calls .venv/bin/choreograph, or activates
    # the virtualenv before calling a bare `choreograph`
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        bare = [line for line in block.splitlines() if re.match(r"\s*choreograph\b", line)]
        if bare:
            assert "source .venv/bin/activate" in block.split(bare[0])[0], block
