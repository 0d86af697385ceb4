"""The HTTP/WebSocket gateway: a supervised process (role `gateway`, off unless
`gateway.listen` is set) that lets producers and consumers speaking HTTP use the pipeline
with the same contracts, guarantees and identity model as ZeroMQ clients."""
