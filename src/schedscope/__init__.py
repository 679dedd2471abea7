"""schedscope: observability sidecar and exporter for LLM-serving GPU schedulers."""

__version__ = "0.1.0"
