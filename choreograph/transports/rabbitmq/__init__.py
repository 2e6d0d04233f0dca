"""``amqp://`` and ``amqps://`` — RabbitMQ (AMQP 0-9-1) 3.10+, no plugin needed.

On the broker, ``ns`` being the namespace: a topic exchange ``ns.events`` (routing key = topic), a
topic exchange ``ns.groups`` (messages for one group: replays, retries, give-backs), one quorum
queue ``ns.g.<group>`` per group, the retry ladder ``ns.delay.<k>`` (k = 0..31: a quorum queue
holding messages 2**k ms, then dead-lettering them, at least once, to rung k-1; a delay of d ms
visits the rungs of the 1-bits of d), and a stream ``ns.dlq`` of dead letters and tombstones.
Guarantees, ordering, limits and settings: ``docs/transport-rabbitmq.md``.
"""

from __future__ import annotations

from choreograph.transports.rabbitmq._errors import ERROR_TABLE, translate
from choreograph.transports.rabbitmq._frames import ATTEMPT
from choreograph.transports.rabbitmq._settings import RabbitMQSettings
from choreograph.transports.rabbitmq._subscription import RabbitMQSubscription
from choreograph.transports.rabbitmq._transport import DELAY_LEVELS, RabbitMQTransport

__all__ = [
    "ATTEMPT",
    "DELAY_LEVELS",
    "ERROR_TABLE",
    "RabbitMQSettings",
    "RabbitMQSubscription",
    "RabbitMQTransport",
    "translate",
]
