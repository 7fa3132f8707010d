"""The platform columns zsmon's built-in checkers and exporters read, with the type each must have.

One place for the shape zsmon expects (docs/invariants.md, "Tables zsmon reads"): the built-in
checkers declare it as ``Checker.columns`` (so a missing column is stood in for, and only the
invariants that read it are skipped), and the ``schema`` checker proves that every column exists
with a type of the right family (money as numeric, times as timestamptz, ...).
"""
from __future__ import annotations

MONEY = "numeric"
TIME = "timestamptz"

COLUMNS: dict[str, dict[str, str]] = {
    "accounts": {"id": "uuid", "did": "text", "balance": MONEY, "total_deposited": MONEY,
                 "total_withdrawn": MONEY, "created_at": TIME, "updated_at": TIME},
    "payment_channels": {"id": "uuid", "payer_did": "text", "payee_did": "text", "auction_id": "text",
                         "total_deposit": MONEY, "current_balance": MONEY, "escrowed_amount": MONEY,
                         "total_settled": MONEY, "pending_refund": MONEY, "state": "text", "task_id": "text",
                         "escrow_released": "boolean", "sequence_number": "bigint", "created_at": TIME,
                         "updated_at": TIME, "closed_at": TIME},
    "channel_transactions": {"id": "uuid", "channel_id": "uuid", "transaction_type": "text", "amount": MONEY,
                             "task_id": "text", "created_at": TIME},
    "auctions": {"id": "uuid", "task_id": "text", "auction_type": "text", "status": "text", "expires_at": TIME,
                 "reserve_price": MONEY, "max_price": MONEY, "min_reputation": "numeric",
                 "winning_bid_id": "uuid", "final_price": MONEY, "created_at": TIME, "updated_at": TIME},
    "bids": {"id": "uuid", "auction_id": "uuid", "agent_did": "text", "price": MONEY,
             "reputation_score": "numeric", "composite_score": "numeric", "created_at": TIME},
    "reputation_scores": {"agent_did": "text", "overall_score": "numeric", "reliability_score": "numeric",
                          "quality_score": "numeric", "speed_score": "numeric", "total_tasks": "integer",
                          "successful_tasks": "integer", "failed_tasks": "integer", "updated_at": TIME},
    "reputation_events": {"id": "uuid", "agent_did": "text", "event_type": "text", "task_id": "text",
                          "score_delta": "numeric", "created_at": TIME},
}


def reads(table: str, *columns: str) -> tuple[str, ...]:
    """``reads("payment_channels", "state", ...)`` -> ("payment_channels.state", ...), checked against COLUMNS."""
    known = COLUMNS[table]
    for c in columns:
        if c not in known:
            raise KeyError(f"{table}.{c} is not in zsmon.checkers.platform.COLUMNS")
    return tuple(f"{table}.{c}" for c in columns)
