"""Implementations of :mod:`choreograph.transport`, one module each, imported lazily by URL."""
