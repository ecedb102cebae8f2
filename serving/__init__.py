"""Serving for streamrec: live recommendations from a model that refreshes itself."""
