"""Implementations of :mod:`choreograph.store`, imported lazily by URL."""
