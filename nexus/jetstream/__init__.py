"""The NATS JetStream engine's shared parts (`engine: nats`): names on the cluster,
connecting, creating the streams and bucket, and a local nats-server for development
and tests. The engine's processes live in nexus/jsingest/ and nexus/jsmember/."""
