"""The servers behind the proxy: per-server state, connection pools, balancing, health checks."""
