"""The interfaces: the `deepe` command line, the HTTP API, the terminal display, Prometheus
metrics, `deepe demo` and `deepe run-local`."""
