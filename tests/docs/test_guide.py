"""Every code block of the guide runs: python in order per page, shell with bash, outputs checked.

Each page runs in its own directory; a page with blocks marked ``nats`` runs a second time with
them, against the NATS server on 127.0.0.1, in a namespace of its own that is deleted afterwards.
How blocks are annotated: :mod:`tests.docs.blocks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from choreograph.envelope import decode
from choreograph.transport import transport_from_url
from tests.docs.blocks import Block, blocks_of, expected_lines
from tests.support.brokers import BROKERS

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "docs" / "index.md", *sorted((ROOT / "docs" / "guide").glob("*.md"))]
NATS_URL = "nats://127.0.0.1:4222"
BIN = str(Path(sys.executable).parent)
#: How long a shell block's output may take to show what it must (guards hangs only).
PATIENCE = 90.0


def page_variants() -> list[object]:
    params: list[object] = []
    for page in PAGES:
        params.append(pytest.param(page, False, id=page.stem))
        if any(b.note("nats") is not None for b in blocks_of(page, ROOT)):
            params.append(pytest.param(page, True, id=f"{page.stem}-nats", marks=pytest.mark.nats))
    return params


class Shell:
    """A shell block running in its own process group, its output in a file."""

    def __init__(self, block: Block, code: str, cwd: Path, env: dict[str, str]) -> None:
        self.block = block
        self.out = cwd / f".out-{block.line}"
        with self.out.open("wb") as sink:
            self.proc = subprocess.Popen(
                ["bash", "-e", "-c", code], cwd=cwd, env=env, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            rc = self.proc.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{block.where}: the shell block did not finish:\n{self.output()}")
        if rc != 0:
            self.stop()
            pytest.fail(f"{block.where}: the shell block exited {rc}:\n{self.output()}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> None:
        """End what the block left running in the background (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class PageRun:
    def __init__(self, page: Path, cwd: Path, namespace: str | None) -> None:
        self.page = page
        self.cwd = cwd
        self.namespace = namespace
        self.module = types.ModuleType(f"guide_{page.stem.replace('-', '_')}")
        self.module.__file__ = str(cwd / "page.py")
        self.shell: Shell | None = None
        self.printed = ""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHOREOGRAPH_")}
        self.env["PATH"] = f"{BIN}:{self.env.get('PATH', '/usr/bin:/bin')}"
        self.env["PYTHONPATH"] = f"{cwd}:{ROOT}"

    def code(self, block: Block) -> str:
        """The block as run: on NATS, in the test's own namespace (``nats NAME``: the block's
        namespace NAME is replaced; otherwise the bare server URL gets a namespace option)."""
        if self.namespace is None:
            return block.code
        if name := block.note("nats"):
            return block.code.replace(name, self.namespace)
        bare = re.escape(NATS_URL) + r"(?![?\w/])"
        return re.sub(bare, f"{NATS_URL}?namespace={self.namespace}", block.code)

    def run(self) -> None:
        sys.modules[self.module.__name__] = self.module
        skipping = False
        for block in blocks_of(self.page, ROOT):
            if block.note("expect") is not None:
                if not skipping:
                    self.expect(block)
                continue
            self.close_shell()
            skipping = block.note("nats") is not None and self.namespace is None
            if not skipping:
                self.run_block(block)
        self.close_shell()

    def run_block(self, block: Block) -> None:
        code = self.code(block)
        if block.lang == "python" and (name := block.note("file")):
            with (self.cwd / name).open("a") as f:
                f.write(code)
        elif block.lang == "python" and (name := block.note("pytest")):
            (self.cwd / name).write_text(code)
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-o", "asyncio_mode=auto", "--rootdir", str(self.cwd), name],
                cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert run.returncode == 0, f"{block.where}:\n{run.stdout}{run.stderr}"
            self.printed = run.stdout
        elif block.lang == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, block.where, "exec"), self.module.__dict__)
            self.printed = printed.getvalue()
        elif block.lang == "sh":
            self.shell = Shell(block, code, self.cwd, self.env)
        elif block.lang == "json" and block.note("envelope") is not None:
            decode(code.encode())
        elif excerpt := block.note("excerpt"):
            assert code in (ROOT / excerpt).read_text(), f"{block.where}: not in {excerpt}"
        else:
            pytest.fail(f"{block.where}: a {block.lang or 'plain'} block the tests cannot run")

    def expect(self, block: Block) -> None:
        patterns = expected_lines(block)
        give_up = time.monotonic() + PATIENCE
        while True:
            text = self.shell.output() if self.shell is not None else self.printed
            lines = text.splitlines()
            missing = [p.pattern for p in patterns if not any(p.search(x) for x in lines)]
            if not missing or self.shell is None or time.monotonic() > give_up:
                break
            time.sleep(0.2)
        assert not missing, f"{block.where}: not printed: {missing}\n--- output:\n{text}"

    def close_shell(self) -> None:
        if self.shell is not None:
            self.shell.stop()
            self.shell = None

    def cleanup(self) -> None:
        self.close_shell()
        for name, module in list(sys.modules.items()):
            if name == self.module.__name__ or str(
                getattr(module, "__file__", "") or ""
            ).startswith(str(self.cwd)):
                del sys.modules[name]
        if self.namespace is not None:
            asyncio.run(_delete_namespace(f"{NATS_URL}?namespace={self.namespace}"))


async def _delete_namespace(url: str) -> None:
    transport = transport_from_url(url)
    await transport.connect()
    try:
        await transport.delete_namespace()
    finally:
        await transport.close()


@pytest.mark.parametrize(("page", "on_nats"), page_variants())
def test_the_code_blocks_of_the_page_run(
    page: Path, on_nats: bool, tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the page's own directory (and, on NATS, its own namespace)
    if on_nats:
        BROKERS["nats"].require()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [k for k in os.environ if k.startswith("CHOREOGRAPH_")]:
        monkeypatch.delenv(name)
    run = PageRun(page, tmp_path, namespace if on_nats else None)
    # when every block runs in order, then none fails and every expected output shows
    try:
        run.run()
    finally:
        run.cleanup()


def test_every_block_of_the_guide_is_one_the_tests_run() -> None:
    runnable = {"python", "sh"}
    for page in PAGES:
        for block in blocks_of(page, ROOT):
            kind_ok = (
                block.lang in runnable
                or (block.lang == "text" and block.note("expect") is not None)
                or (block.lang == "json" and block.note("envelope") is not None)
                or bool(block.note("excerpt"))
            )
            assert kind_ok, f"{block.where}: a {block.lang or 'plain'} block no test runs"
