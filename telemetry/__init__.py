"""Sidecar side: raw-event schema, ingest, and the raw events -> OpenTelemetry semantics.

Importing this package must never import torch (the sidecar starts in well under a second).
"""
