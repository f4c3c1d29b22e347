"""UDP: per-session flows over one listener socket (the listener, the session
table, and the sockets that receive and answer from the original destination)."""
