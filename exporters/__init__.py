"""Exporters: OTLP, Prometheus /metrics, KV-event relay and ingest, Perfetto, files."""
