"""The router process: intake (validation, rate limits), the journal and its
segments, durability (flusher, storage state), fan-out streams and the group
coordinator, cursors, dead letters and the admin requests."""
