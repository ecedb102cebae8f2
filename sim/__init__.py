"""Simulated users and replayed datasets that drive streamrec end to end: the closed-loop user
simulator, dataset replay sources, ``streamrec demo`` and its report."""
