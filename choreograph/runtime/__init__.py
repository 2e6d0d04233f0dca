"""Running services against a transport: handling, timers, the outbox relay, and the runtime."""
