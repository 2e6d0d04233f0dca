#!/usr/bin/env bash
# Install the programs some tests need beside the Python packages, when missing. Idempotent, and
# quick when everything is there already.
# Graphviz's dot draws `choreograph graph -f svg/png`; rabbitmqctl adds users in RabbitMQ tests;
# Node.js runs the official AsyncAPI parser (tools/asyncapi-validate) and the Node.js participant
# of the contract tests (tests/contracts/node), whose npm packages come from their lock files.
set -eu
cd "$(dirname "$0")/.."
missing=()
command -v dot >/dev/null || missing+=(graphviz)
command -v rabbitmqctl >/dev/null || missing+=(rabbitmq-server)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
for project in tools/asyncapi-validate tests/contracts/node; do
  # npm ci again only when the lock file changed since the last install
  if [ ! -f "$project/node_modules/.package-lock.json" ] ||
     [ "$project/package-lock.json" -nt "$project/node_modules/.package-lock.json" ]; then
    (cd "$project" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done
