"""The producer SDK: `Producer` and `AsyncProducer`, and the outbox that keeps
unconfirmed batches until the router ACKs them."""
