"""The NATS engine's ingest process (the `router` role under `engine: nats`): producers
connect to it exactly as to the embedded router; it validates their events and stores
them in JetStream, and answers the launcher's and CLI's requests from the cluster."""
