#!/usr/bin/env bash
# Start each server the tests need, unless it already listens on its port. Idempotent.
set -u

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2 seconds=$3
  for _ in $(seq 1 $((seconds * 5))); do
    listening "$port" && { echo "$name is up on $port"; return 0; }
    sleep 0.2
  done
  echo "$name did not come up on port $port within ${seconds}s" >&2
  return 1
}

status=0
if ! listening 6379; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 6379 30 || status=1
fi
if ! listening 4222; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_for NATS 4222 30 || status=1
fi
rabbitmq_file_handles() {
  timeout 30 rabbitmqctl status 2>/dev/null | awk '/File Descriptors/ {f = 1} f && /limit/ {print $NF; exit}'
}
# Under CI, a RabbitMQ started elsewhere with the usual 1024 open files is restarted with room.
if [ "${CI:-}" = true ] && listening 5672; then
  handles=$(rabbitmq_file_handles)
  if [ -n "$handles" ] && [ "$handles" -lt 10000 ]; then
    echo "RabbitMQ has $handles file handles: restarting it with more"
    rabbitmqctl stop >/dev/null 2>&1
    for _ in $(seq 1 300); do listening 5672 || break; sleep 0.2; done
  fi
fi
if ! listening 5672; then
  bash "$(dirname "$0")/start-rabbitmq.sh"
  wait_for RabbitMQ 5672 120 || status=1
fi
if ! listening 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  wait_for PostgreSQL 5432 60 || status=1
fi
exit $status
