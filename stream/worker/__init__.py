"""The stream worker (``streamrec worker``): decode and validate events, drop duplicates, join
clicks to their slates, log everything with its display-bias metadata, and send dead letters,
examples and anomalies to Kafka."""
