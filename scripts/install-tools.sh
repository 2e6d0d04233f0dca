#!/usr/bin/env bash
# Install the programs some tests need beside the Python packages, when missing. Idempotent.
# Graphviz's dot draws `choreograph graph -f svg/png`; rabbitmqctl adds users in RabbitMQ tests.
set -eu
missing=()
command -v dot >/dev/null || missing+=(graphviz)
command -v rabbitmqctl >/dev/null || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
