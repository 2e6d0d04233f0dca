#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into fresh virtualenvs outside the repository
# with one extra at a time, and use it the way the README says. Called by .ci/run; takes a few
# minutes (most of it installing dependencies).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/choreograph-wheel.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "check-wheel: $*" >&2; exit 1; }
step() { echo "check-wheel: $*"; }

step "building the wheel"
# from a copy of the tracked files: a build/ left in the work tree could add stale modules
mkdir "$work/src"
git -C "$repo" ls-files -z \
  | tar -C "$repo" --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/src"
"$python" -m pip wheel --no-deps --no-cache-dir -w "$work/dist" "$work/src" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; fail "the wheel did not build"; }
if grep -i "license" "$work/build.log" | grep -iq "deprecat"; then
  grep -i -B2 -A2 "license" "$work/build.log" >&2
  fail "building the wheel warns about the license metadata"
fi
wheel=$(ls "$work"/dist/choreograph-*.whl)

step "checking what the wheel holds"
"$python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert tops == ["choreograph"], f"top-level packages in the wheel: {tops}"
assert "choreograph/py.typed" in names, "no choreograph/py.typed"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE"
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
assert "License-Expression: Apache-2.0" in text, "no SPDX License-Expression"
EOF

# A fresh virtualenv with the wheel and one extra; prints the venv's bin directory.
venv_with() {
  local extra=$1 venv="$work/venv-$1"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[$extra]" \
    >"$work/install-$extra.log" 2>&1 || { cat "$work/install-$extra.log" >&2; fail "install [$extra]"; }
  echo "$venv/bin"
}

# Each broker extra installs what its transport imports (the URL is not contacted). The three run
# at once: installing is mostly waiting.
check_backend() {
  local extra=$1 code=$2 bin
  bin=$(venv_with "$extra")
  (cd "$work" && "$bin/python" -c "$code") || fail "[$extra] does not bring what its backend imports"
}
step "[rabbitmq], [redis], [postgres], [sqlalchemy]: each backend imports with its extra alone"
checks=()
check_backend rabbitmq "from choreograph.transport import transport_from_url as t; t('amqp://127.0.0.1:5672/')" &
checks+=($!)
check_backend redis "from choreograph.transport import transport_from_url as t; t('redis://127.0.0.1:6379/0')" &
checks+=($!)
check_backend postgres "from choreograph.store import store_from_url as s; s('postgresql://127.0.0.1/x', 'a')" &
checks+=($!)
check_backend sqlalchemy "
import asyncio
from sqlalchemy import text
from choreograph.orm import session_on
from choreograph.store import store_from_url

async def main():
    store = store_from_url('memory://', 'a')
    await store.open()
    async with store.transaction() as tx, session_on(tx) as session:
        assert (await session.execute(text('SELECT 1'))).scalar_one() == 1
    await store.close()

asyncio.run(main())" &
checks+=($!)
for pid in "${checks[@]}"; do wait "$pid" || fail "a backend extra is incomplete"; done

step "[nats]: --help, the README's hello flow, and a one-line message for demo and console"
bin=$(venv_with nats)
(cd "$work" && "$bin/python" -c "from choreograph.transport import transport_from_url as t; t('nats://127.0.0.1:4222')")
"$bin/choreograph" --help >"$work/help.txt" || fail "choreograph --help failed"
grep -q "publish" "$work/help.txt" || fail "choreograph --help lists no publish command"
hello="$work/hello"
mkdir "$hello"
cp "$repo/examples/hello.py" "$hello/hello.py"
# Published before the services start: publish --app declares their groups, so it is kept.
(cd "$hello" && "$bin/choreograph" publish Ping '{"text": "hi"}' --app hello:app) >/dev/null
(cd "$hello" && exec "$bin/choreograph" run --app hello:app) >"$hello/run.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 150); do
  grep -q "ping got 'HI'" "$hello/run.out" && break
  sleep 0.2
done
grep -q "ping got 'HI'" "$hello/run.out" || { cat "$hello/run.out" >&2; fail "the hello example lost its event"; }
kill -TERM "${pids[-1]}"
wait "${pids[-1]}" || fail "choreograph run did not stop cleanly on SIGTERM"
status=0
(cd "$work" && "$bin/choreograph" demo -n 1 >demo.out 2>demo.err) || status=$?
[ "$status" -ne 0 ] || fail "choreograph demo ran without the demo extra"
[ "$(wc -l <"$work/demo.err")" -eq 1 ] || { cat "$work/demo.err" >&2; fail "demo without the extra printed more than one line"; }
grep -q "choreograph\[demo\]" "$work/demo.err" || { cat "$work/demo.err" >&2; fail "demo without the extra does not name it"; }
status=0
(cd "$work" && "$bin/choreograph" console >console.out 2>console.err) || status=$?
[ "$status" -ne 0 ] || fail "choreograph console ran without the http extra"
[ "$(wc -l <"$work/console.err")" -eq 1 ] || { cat "$work/console.err" >&2; fail "console without the extra printed more than one line"; }
grep -q "choreograph\[http\]" "$work/console.err" || { cat "$work/console.err" >&2; fail "console without the extra does not name it"; }

step "[demo]: choreograph demo -n 20"
bin=$(venv_with demo)
(cd "$work" && "$bin/choreograph" demo -n 20 >demo20.out 2>&1) || { cat "$work/demo20.out" >&2; fail "the demo failed"; }

step "[demo] with pytest: the README's testing example, on the installed plugin's harness fixture"
"$bin/python" -m pip install --quiet --disable-pip-version-check pytest pytest-asyncio \
  >"$work/install-pytest.log" 2>&1 || { cat "$work/install-pytest.log" >&2; fail "install pytest"; }
mkdir "$work/usertests"
"$python" - "$repo/README.md" "$work/usertests" <<'EOF'
import pathlib, re, sys
block = re.search(r"```python\n(# (test_\w+\.py) .*?)```", pathlib.Path(sys.argv[1]).read_text(), re.S)
assert block is not None, "the README shows no test file"
(pathlib.Path(sys.argv[2]) / block.group(2)).write_text(block.group(1))
EOF
(cd "$work/usertests" && "$bin/python" -m pytest -q -p no:cacheprovider -o asyncio_mode=auto \
  >"$work/usertests.out" 2>&1) || { cat "$work/usertests.out" >&2; fail "the README's testing example failed"; }
step "ok"
