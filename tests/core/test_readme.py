"""The README's shortest example is examples/hello.py, and it works as the README says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from choreograph.testing import Harness
from choreograph.transport import DEFAULT_TRANSPORT_URL
from examples.hello import Ping, Pong, app
from tests.support.procs import clean_env, free_port, wait_until

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


def readme_recipe() -> str:
    """The README's shell block that runs the drone delivery one process per service."""
    readme = (ROOT / "README.md").read_text()
    pattern = r"```sh\n(source \.venv/bin/activate\nexport CHOREOGRAPH_APP=.*?)```"
    block = re.search(pattern, readme, re.S)
    assert block is not None, "the README no longer shows the drone delivery in processes"
    return block.group(1)


@pytest.mark.slow
def test_the_readme_recipe_runs_the_drone_delivery_in_processes(tmp_path: Path) -> None:
    # Given the README's recipe, pasted whole into bash in a fresh directory where `.venv` is the
    # repository's, on a free port rather than 8000 (another program may hold that one)
    port = free_port()
    script = readme_recipe().replace("8000", str(port))
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    output = tmp_path / "out.txt"
    with output.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=tmp_path, env=clean_env(), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        # When it has run to its end (the services stay, in the background)
        assert shell.wait(180) == 0, output.read_text()
        # Then the request was accepted while the services were still starting, and the
        # delivery it made ends
        text = output.read_text()
        assert "HTTP/1.1 202 Accepted" in text, text
        location = re.search(r"^location: (\S+)", text, re.M | re.I)
        assert location is not None, text
        wait_until(
            lambda: _status(port, location.group(1)) in ("completed", "failed"),
            90,
            "the delivery to end",
        )
    finally:
        _stop_group(shell.pid)
    assert output.read_text().count("stopped cleanly") == 6


def _status(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return str(json.loads(answer.read())["status"])


def _stop_group(pgid: int) -> None:
    """SIGTERM every process the recipe started (its process group) and wait until all exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, 60, "the recipe's processes to stop")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_the_readme_testing_example_passes_as_it_is(tmp_path: Path) -> None:
    # Given the README's example test file, copied as it is into a directory of its own
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(# (test_\w+\.py) .*?)```", readme, re.S)
    assert block is not None, "the README no longer shows a test of the drone delivery"
    (tmp_path / block.group(2)).write_text(block.group(1))
    # When pytest runs it (the harness fixture comes from the installed plugin)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "--rootdir", str(tmp_path), block.group(2)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # Then both of its tests pass
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout, run.stdout


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
