"""What the proxy tells operators: metrics, access log, /status, the admin listener and dashboard."""
