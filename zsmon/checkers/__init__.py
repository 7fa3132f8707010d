"""Checkers: one module per checker. ``registry.checker_classes()`` finds them all."""
