"""The job store: tables, engines and upgrades, every state transition, read-only queries, worker heartbeats."""
