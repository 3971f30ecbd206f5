"""HTTP/2 to clients: the ``h2`` state machine around a client connection, and header mapping (RFC 9113)."""
