"""Reference systems built on choreograph's public API."""
