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
bash scripts/node-tools.sh
