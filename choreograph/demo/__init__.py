"""The drone delivery reference system. ``create_app()`` builds the app; ``demo`` runs it."""

from choreograph.demo.app import create_app

__all__ = ["create_app"]
