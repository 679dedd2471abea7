"""Grafana dashboard JSON and Prometheus rules, shipped as package data."""

from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent
