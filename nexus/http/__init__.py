"""The launcher's HTTP port, a supervised process of its own: Prometheus metrics for
the whole pipeline, /healthz and /readyz, and the live dashboard."""
