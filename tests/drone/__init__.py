"""End-to-end tests of the drone delivery reference system (examples/drone_delivery)."""
