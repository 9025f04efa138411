"""What a worker records of itself: the heartbeat's counters and the `--trace` event log."""
