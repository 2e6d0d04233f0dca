"""choreograph: choreographed microservices for Python.

Services react to events on a bus and report what they did as new events; joins, compensations,
deadlines, retries and dead letters are declared next to the handlers. See the README.
"""

from choreograph.app import App, External, load_app
from choreograph.clock import Clock, SystemClock, VirtualClock
from choreograph.context import Context, State
from choreograph.envelope import Envelope
from choreograph.errors import (
    ChoreographError,
    ConfigurationError,
    InvalidMessage,
    MalformedEnvelope,
    PayloadTooLarge,
    PermanentFailure,
    RetryLater,
    SchemaViolation,
    TopicMismatch,
    TransportError,
    UnknownEventType,
)
from choreograph.events import (
    CompensationFailed,
    DeadlineExpired,
    Event,
    HandlerFailed,
    JoinTimedOut,
    upcaster,
)
from choreograph.middleware import Middleware, Outcome
from choreograph.retry import RetryPolicy
from choreograph.runtime.runner import Runtime, UnitOfWork
from choreograph.runtime.worker import WorkerSettings
from choreograph.service import Parts, Service
from choreograph.transport import Transport, transport_from_url

__version__ = "0.1.0"

__all__ = [
    "App",
    "ChoreographError",
    "Clock",
    "CompensationFailed",
    "ConfigurationError",
    "Context",
    "DeadlineExpired",
    "Envelope",
    "Event",
    "External",
    "HandlerFailed",
    "InvalidMessage",
    "JoinTimedOut",
    "MalformedEnvelope",
    "Middleware",
    "Outcome",
    "Parts",
    "PayloadTooLarge",
    "PermanentFailure",
    "RetryLater",
    "RetryPolicy",
    "Runtime",
    "SchemaViolation",
    "Service",
    "State",
    "SystemClock",
    "TopicMismatch",
    "Transport",
    "TransportError",
    "UnitOfWork",
    "UnknownEventType",
    "VirtualClock",
    "WorkerSettings",
    "__version__",
    "load_app",
    "transport_from_url",
    "upcaster",
]
