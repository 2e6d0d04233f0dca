"""End-to-end tests of the drone delivery reference system (choreograph/demo)."""
