"""What operators run against the event log: queries, follow, replay, status,
retry, ``check``, and their command-line rendering. Reads MongoDB only (``check``
also opens a session to each PBX); never the lock table's hot path."""
