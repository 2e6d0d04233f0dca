"""``python -m chaos`` (``make chaos``): the drone delivery under faults, process per service.

Random SIGKILLs of service processes (restarted after a short pause), malformed messages beside
valid traffic and, on NATS, a 3-node JetStream cluster whose nodes are killed too. Bounded in
count and time; prints one table and exits non-zero on any loss, double effect, held resource,
stall or crash. See ``docs/reliability.md``.
"""
