"""Where each event really travels on a transport: the addresses, bindings and headers of the
AsyncAPI document when it is written for a server (``choreograph asyncapi --server URL``).

The names come from the transports' own naming code and settings (the URL's ``namespace``,
RabbitMQ's vhost), so the document says what a client written from it must use:

- ``nats://``: a topic is the subject ``{ns}.ev.<topic token>`` of the stream ``{ns}_events``;
  a group reads it through the durable pull consumer ``<group>~<topic token>``; the event id
  travels in the ``Nats-Msg-Id`` header.
- ``amqp://``: a topic is the routing key of the topic exchange ``{ns}.events``; a group reads
  its quorum queue ``{ns}.g.<group>``; the event id is the ``message_id`` property and the topic
  the ``type`` property.
- ``redis://``: a group reads its stream ``{ns}:g:<group>``; a topic has no stream of its own:
  publishing adds the message record to the stream of each group named in the set
  ``{ns}:t:<topic>`` (``docs/guide/other-languages.md`` shows how).
- ``sqlite://``, ``memory://``: the address is the topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from choreograph.transport import TransportSettings, transport_from_url

_AMQP_BINDING = "0.3.0"


@dataclass(frozen=True, slots=True)
class Wire:
    """How one server carries events: see the module docstring."""

    protocol: str
    namespace: str = ""
    host: str = "localhost"
    pathname: str = ""
    vhost: str = "/"

    def server(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"host": self.host, "protocol": self.protocol}
        if self.pathname:
            doc["pathname"] = self.pathname
        if self.namespace:
            doc["x-choreograph-namespace"] = self.namespace
        if self.protocol == "amqp":
            doc["protocolVersion"] = "0.9.1"
        return doc

    def topic_channel(self, topic: str) -> dict[str, Any]:
        """The channel an event of ``topic`` is published to."""
        ns = self.namespace
        if self.protocol == "nats":
            from choreograph.transports.nats._names import Names

            return {
                "address": Names(ns).topic_subject(topic),
                "x-choreograph-nats": {"stream": Names(ns).events},
            }
        if self.protocol == "amqp":
            return {
                "address": topic,
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": f"{ns}.events", "type": "topic", "durable": True,
                                     "autoDelete": False, "vhost": self.vhost},
                        "bindingVersion": _AMQP_BINDING,
                    }
                },
            }  # fmt: skip
        if self.protocol == "redis":
            return {
                "address": None,
                "description": f"No stream of its own: a message of {topic} is added to the "
                f"stream {{{ns}}}:g:<group> of every group in the set {{{ns}}}:t:{topic}.",
                "x-choreograph-redis": {"groups-set": f"{{{ns}}}:t:{topic}"},
            }
        return {"address": topic}

    def group_channel(self, group: str) -> dict[str, Any] | None:
        """The channel ``group`` reads, when it has one of its own (a queue, a stream)."""
        ns = self.namespace
        if self.protocol == "amqp":
            name = f"{ns}.g.{group}"
            return {
                "address": name,
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {"name": name, "durable": True, "exclusive": False,
                                  "autoDelete": False, "vhost": self.vhost},
                        "bindingVersion": _AMQP_BINDING,
                    }
                },
                "x-choreograph-amqp": {"queue-type": "quorum"},
            }  # fmt: skip
        if self.protocol == "redis":
            return {
                "address": f"{{{ns}}}:g:{group}",
                "x-choreograph-redis": {"consumer-group": group},
            }
        return None

    def receive_extras(self, group: str, topic: str) -> dict[str, Any]:
        """What a receive operation of ``group`` on ``topic`` adds (the consumer it reads)."""
        if self.protocol == "nats":
            from choreograph.transports.nats._names import Names

            return {
                "x-choreograph-nats": {
                    "stream": Names(self.namespace).events,
                    "durable": Names.topic_consumer(group, topic),
                    "filter-subject": Names(self.namespace).topic_subject(topic),
                    "ack-policy": "explicit",
                    "deliver-policy": "new",
                }
            }
        if self.protocol == "amqp":
            return {"bindings": {"amqp": {"ack": True, "bindingVersion": _AMQP_BINDING}}}
        return {}

    def send_extras(self) -> dict[str, Any]:
        if self.protocol == "amqp":
            return {
                "bindings": {
                    "amqp": {"deliveryMode": 2, "mandatory": False, "bindingVersion": _AMQP_BINDING}
                }
            }
        return {}

    def message_extras(self, topic: str) -> dict[str, Any]:
        """Headers or bindings a message of ``topic`` carries beside its body."""
        if self.protocol == "nats":
            return {
                "headers": {
                    "type": "object",
                    "properties": {
                        "Nats-Msg-Id": {
                            "type": "string",
                            "description": "The event id: JetStream drops a copy published "
                            "again within the stream's duplicate window.",
                        }
                    },
                }
            }
        if self.protocol == "amqp":
            return {"bindings": {"amqp": {"messageType": topic, "bindingVersion": _AMQP_BINDING}}}
        return {}


def wire_for(server: str | None) -> Wire:
    """The wire of the bus at ``server`` (a transport URL), or the plain one (addresses are the
    event types) without one. Raises ``ConfigurationError`` for a URL no transport accepts."""
    if server is None:
        return Wire("choreograph")
    settings: TransportSettings | None = getattr(transport_from_url(server), "settings", None)
    protocol = server.partition("://")[0]
    namespace = settings.namespace if settings is not None else ""
    # where, never how to log in: no user, password or token, no options
    rest = server.partition("://")[2].split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2] or "localhost"
    vhost = str(getattr(settings, "vhost", "/"))
    return Wire(protocol, namespace, host, slash + path if path else "", vhost)
