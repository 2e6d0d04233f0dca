"""``redis://`` — the bus on Redis Streams (Redis >= 6.2; built and tested on 7.0).

Every key lives under ``{<namespace>}:`` (the braces are a Redis Cluster hash tag, so a namespace
stays on one shard and the Lua scripts may touch all of its keys):

=========================  ===================================================================
``{ns}:g:<group>``         the group's stream, read through the consumer group ``<group>``
``{ns}:t:<topic>``         set of the groups that declared ``<topic>``
``{ns}:groups``            set of every declared group
``{ns}:delayed``           sorted set of pending retries, score = due time (server µs)
``{ns}:delayed:n``         hash group -> number of its pending retries (for :meth:`lag`)
``{ns}:dlq:<group>``       the group's dead letters, a stream
``{ns}:g:<group>:<p>``     partition ``p`` of a key-partitioned group (``partitioned=``; the
                           leases and members it needs: ``_partition_lua``)
=========================  ===================================================================

Publishing fans out inside one Lua script: it reads each topic's set of groups and appends the
message to each group's stream, atomically, so a returned publish reached every group declared at
that moment. Settling (ack, retry, dead-letter, give back on close) is one script each, so the
entry leaves the stream in the same step as it lands where it goes next. Entries are deleted when
settled: a group's stream only ever holds what is undelivered or leased. See
``docs/transport-redis.md`` for the guarantees and for running it in production.
"""

from __future__ import annotations

from choreograph.transports.redis._errors import translate_error
from choreograph.transports.redis._settings import RedisSettings
from choreograph.transports.redis._subscription import RedisSubscription
from choreograph.transports.redis._transport import RedisTransport

__all__ = ["RedisSettings", "RedisSubscription", "RedisTransport", "translate_error"]
