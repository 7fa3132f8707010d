"""Exporters: one module per family of metrics; the registry (``zsmon.core.registry``) finds them."""
