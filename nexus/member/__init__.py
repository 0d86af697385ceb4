"""The worker-group member process: a runtime (sockets, loop, tasks) wired from parts
without sockets: the partitions it holds, the fetcher, the scheduler of handler calls,
the outcome policy (retries, breaker, dead letters), follow-up settlement, recycle
limits, the group client (coord messages), handler loading and context; plus the
heartbeat and watchdog threads. See runtime.py for the map."""
