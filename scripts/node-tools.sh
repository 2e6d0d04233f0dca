#!/usr/bin/env bash
# The npm packages of the Node.js projects some tests run (the official AsyncAPI parser in
# tools/asyncapi-validate, the Node.js participant in tests/contracts/node), from their lock
# files: npm ci again only when a lock file changed since the last install. Called by `make test`
# and scripts/install-tools.sh. Without npm it says so and installs nothing: the tests that need
# Node.js then fail, saying what to install.
set -eu
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null; then
  echo "node-tools: no npm on PATH, so the Node.js tests will fail (bash scripts/install-tools.sh installs Node.js)" >&2
  exit 0
fi
for project in tools/asyncapi-validate tests/contracts/node; do
  if [ ! -f "$project/node_modules/.package-lock.json" ] ||
     [ "$project/package-lock.json" -nt "$project/node_modules/.package-lock.json" ]; then
    echo "node-tools: npm ci in $project"
    (cd "$project" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done
