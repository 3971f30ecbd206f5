"""Support modules for scripts/bench (the pyproxy benchmark harness). Standard library only."""
