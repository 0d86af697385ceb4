"""A worker group's member under `engine: nats`: owns partitions through the KV bucket,
reads them through JetStream consumers, runs the group's handler as the embedded
engine's member does (nexus/member/ parts), acks, dead-letters into JetStream."""
