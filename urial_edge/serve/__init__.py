"""``urial-edge serve``: the HTTP server, discovery of running servers, and the client ``ask``/``chat`` use."""
