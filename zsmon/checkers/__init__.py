"""Checkers: one module per checker; the registry (``zsmon.core.registry``) finds them all."""
