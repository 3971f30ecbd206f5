"""pyproxy: a reverse proxy and HTTP load balancer. Everything HTTP lives here; networking is in core."""
__version__ = "0.1.0"
