"""The event side of streamrec: the event and example contracts, the producer SDK, the stream
worker, anomaly detection, the event log and the local broker launcher."""
