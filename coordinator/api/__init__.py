"""The coordinator's surfaces: the gRPC service and its checks, the process that serves it, the DHT rendezvous, metrics."""
