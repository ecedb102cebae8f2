"""Benchmarks, one module each: ``python -m bench.<name>`` prints one JSON line (see DESIGN.md)."""
