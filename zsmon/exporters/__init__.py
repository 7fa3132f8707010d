"""Exporters: one module per family of metrics. ``registry.exporter_classes()`` finds them."""
