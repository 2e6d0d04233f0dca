#!/usr/bin/env bash
# What the shared servers looked like when a CI run failed: alarms, limits, connections and the
# last lines of each server's log, so that a broker-side cause can be told from a project bug.
set -u
section() { printf '\n=== %s ===\n' "$1"; }

section "machine"
uptime; free -m | head -2; df -h / /tmp 2>/dev/null | uniq
section "listening ports"
ss -ltn 2>/dev/null | grep -E ':(4222|5432|5672|6379) ' || echo "(ss not available)"
section "TCP connections to 5672 by state"
ss -tan 2>/dev/null | awk '$4 ~ /:5672$/ || $5 ~ /:5672$/ {print $1}' | sort | uniq -c
section "RabbitMQ status (alarms, file descriptors, memory)"
timeout 30 rabbitmqctl status 2>&1 | grep -A4 -iE "alarms|file descriptors|^memory|total memory" | head -40
section "RabbitMQ connections"
timeout 30 rabbitmqctl list_connections -q name state 2>&1 | head -20
for log in /var/log/rabbitmq/rabbit@*.log /var/log/nats-server.log /var/log/redis/ci.log \
  /var/log/postgresql/postgresql-*-main.log; do
  [ -f "$log" ] || continue
  section "last lines of $log"
  tail -n 40 "$log" | cut -c1-300
done
exit 0
