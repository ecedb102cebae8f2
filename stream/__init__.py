"""The event side of streamrec: the event contract, the producer SDK, the Faust app and the local broker."""
