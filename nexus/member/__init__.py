"""The worker-group member process: the runtime that joins a group and fetches its
partitions, the dispatcher and its outcome policy (retries, breaker, dead letters),
handler loading and context, heartbeats and the watchdog."""
