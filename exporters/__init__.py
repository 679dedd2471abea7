"""Exporters: OTLP, Prometheus /metrics, KV-event relay and ingest, Perfetto, files.

One module per destination, imported on demand (nothing heavy at package import):
``otlp`` (ExportConfig, build_tracer_provider, build_meter_provider), ``prometheus``
(serve_metrics), ``kv_relay`` (KvRelay), ``kv_ingest`` (KvIngest), ``kv_wire`` (the SGLang/vLLM
KV wire format), ``perfetto`` (PerfettoSpanExporter), ``otlp_file`` (OTLP JSON lines) and
``stats`` (exporter health counters: EXPORT_STATS, ExportStatsCollector).
"""
