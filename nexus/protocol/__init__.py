"""What every process shares on the wire: the event and its contracts, the partition
rule, the messages each socket carries, the ZeroMQ transport helpers and typed request
clients."""
