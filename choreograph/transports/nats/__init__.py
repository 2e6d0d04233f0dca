"""``nats://`` — the bus on NATS JetStream (``pip install 'choreograph[nats]'``).

One file-storage stream per namespace holds the events (``{ns}_events``); a group is a set of
durable pull consumers on it, one per declared topic (nats-server 2.9 allows one filter subject
per consumer) plus one for the messages sent to the group alone. Dead letters live in a second
stream (``{ns}_dlq``). A key-partitioned group (``partitioned=``) also has a consumer per
partition, fed by a router member, and a stream of leases (``_partitions``; ``docs/ordering.md``).
``docs/transport-nats.md`` states the guarantees, the ordering, the limits
of nats-server 2.9 and how this transport works within them, and how to run it in production.
"""

from __future__ import annotations

from choreograph.transports.nats._settings import NatsSettings
from choreograph.transports.nats._subscription import NatsSubscription
from choreograph.transports.nats._transport import NatsTransport

__all__ = ["NatsSettings", "NatsSubscription", "NatsTransport"]
