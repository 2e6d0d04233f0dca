#!/usr/bin/env bash
# Start the machine's RabbitMQ detached, with as many open files as the machine allows.
# RabbitMQ sizes its file handles from the limit it starts with (927 of the usual 1024), and a
# long test run with many quorum queues and connections must not run out of them: when it does,
# new connections hang before the AMQP handshake. Debian's wrapper switches user with `su`, which
# resets the limit to 1024, so the server is started as its user with setpriv instead.
set -eu
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && command -v setpriv >/dev/null \
  && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  cd /var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached
fi
exec rabbitmq-server -detached
