"""A simulator of the platform's traffic: correct state transitions, deterministic
from a seed, and fault injection that plants each invariant's violation on purpose.

One module per domain (payments, auctions, reputation); the tests and ``zsmon demo`` use them.
"""
