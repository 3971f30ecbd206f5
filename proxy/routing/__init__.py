"""Which route a request takes: host and path matching, and the routing table `check` prints."""
