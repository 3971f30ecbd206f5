"""HTTP/1.1 on the wire: the parser, outbound heads, canned responses, TLS termination, tunnels."""
