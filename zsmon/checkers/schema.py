"""Checker ``schema``: the tables and columns zsmon reads exist.

A platform migration that renames a column would otherwise surface as a
checker error far from its cause; this names the missing column directly.
"""
from __future__ import annotations

from zsmon.core.checker import Checker, CheckContext, Invariant

# The columns zsmon's checkers and exporters read (docs/invariants.md).
REQUIRED: dict[str, tuple[str, ...]] = {
    "accounts": ("id", "did", "balance", "total_deposited", "total_withdrawn", "created_at", "updated_at"),
    "payment_channels": ("id", "payer_did", "payee_did", "auction_id", "total_deposit", "current_balance",
                         "escrowed_amount", "total_settled", "pending_refund", "state", "task_id",
                         "escrow_released", "sequence_number", "created_at", "updated_at", "closed_at"),
    "channel_transactions": ("id", "channel_id", "transaction_type", "amount", "task_id", "created_at"),
    "auctions": ("id", "task_id", "auction_type", "status", "expires_at", "reserve_price", "max_price",
                 "min_reputation", "winning_bid_id", "final_price", "created_at", "updated_at"),
    "bids": ("id", "auction_id", "agent_did", "price", "reputation_score", "composite_score", "created_at"),
    "reputation_scores": ("agent_did", "overall_score", "reliability_score", "quality_score", "speed_score",
                          "total_tasks", "successful_tasks", "failed_tasks", "updated_at"),
    "reputation_events": ("id", "agent_did", "event_type", "task_id", "score_delta", "created_at"),
}


class SchemaChecker(Checker):
    name = "schema"
    description = "The platform tables and columns zsmon reads are present in the monitored database."
    invariants = (
        Invariant("required_columns_present",
                  "Every table and column zsmon reads exists (a migration renamed or dropped one otherwise).",
                  entity_type="column", severity="warning"),
    )
    default_interval_seconds = 300.0

    def run(self, ctx: CheckContext) -> None:
        tables = [t for t, cols in REQUIRED.items() for _ in cols]
        columns = [c for cols in REQUIRED.values() for c in cols]
        ctx.find(
            "required_columns_present",
            """
            SELECT r.tbl || '.' || r.col AS entity_id, 'present' AS expected, 'missing' AS actual,
                   NULL::numeric AS difference,
                   'column ' || r.col || ' of table ' || r.tbl || ' is missing from schema '
                       || current_schema() || ': checkers reading it will error' AS detail
            FROM unnest(%s::text[], %s::text[]) AS r(tbl, col)
            LEFT JOIN information_schema.columns c
                   ON c.table_schema = current_schema() AND c.table_name = r.tbl AND c.column_name = r.col
            WHERE c.column_name IS NULL
            """,
            (tables, columns),
        )
