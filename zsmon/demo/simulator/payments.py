"""Payment traffic as the platform should make it, and the faults it must never make.

``PaymentSimulator(conn, seed)`` drives the state transitions of
``docs/invariants.md`` ("Payment transitions"), each one
a transaction of its own that locks what it reads with ``SELECT ... FOR UPDATE``
(always the channel before an account, one account at a time, so concurrent
simulators neither deadlock nor lose updates). Given the same seed and a database
to itself, a simulator makes the same channels, tasks and amounts.

    sim = PaymentSimulator(conn, seed=1)     # conn: a read-write psycopg connection, autocommit
    sim.run(1000)                            # random, correct traffic
    cid = inject_fault(conn, "money_from_nowhere")   # -> the channel id it broke

Transitions (all return None when the platform would refuse them):
``deposit``, ``withdraw``, ``open_channel``, ``lock_escrow``, ``release_escrow``
(``success=True`` pays the payee, ``False`` refunds the channel), ``close_channel``.

``FAULTS`` maps a fault name to the invariant it breaks, the function that plants
it and the invariants that necessarily fire with it (a channel that is not
conserved cannot reconcile with its ledger either; an account credited from
nowhere also breaks the global sum). Every fault bumps ``updated_at`` or writes a
ledger row, as a buggy platform write would, so incremental runs see it too.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

import psycopg
from psycopg.rows import dict_row

UNIT = Decimal("0.00000001")

__all__ = ["PaymentSimulator", "DeployedPayments", "FAULTS", "Fault", "inject_fault", "UNIT"]


def _money(value: Decimal | int | str) -> Decimal:
    return Decimal(value).quantize(UNIT)


class PaymentSimulator:
    """Correct payment traffic on a read-write connection (autocommit; one transaction per operation)."""

    def __init__(self, conn: psycopg.Connection, seed: int = 0, *, users: int = 20, agents: int = 10,
                 prefix: str = "did:sim") -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.users = [f"{prefix}:user:{i}" for i in range(users)]
        self.agents = [f"{prefix}:agent:{i}" for i in range(agents)]
        # Channels this simulator opened, with the state it last left them in (it alone moves them).
        self.channels: dict[str, str] = {}

    # ---- helpers ----------------------------------------------------------------
    def _amount(self, low: str = "0.00000001", high: str = "100") -> Decimal:
        lo, hi = int(Decimal(low) / UNIT), int(Decimal(high) / UNIT)
        return _money(Decimal(self.rng.randint(lo, hi)) * UNIT)

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _tx(self, fn: Callable[[psycopg.Cursor], Any]) -> Any:
        """``fn`` in one transaction; None when the database refuses it. A planted fault can leave a row a
        correct transition cannot follow (a channel whose balance went negative refunds a negative amount on
        close): the schema's CHECK rolls the write back, as it would the platform's, and traffic goes on."""
        for attempt in range(5):
            try:
                with self.conn.transaction(), self.conn.cursor(row_factory=dict_row) as cur:
                    return fn(cur)
            except psycopg.errors.CheckViolation:
                return None
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == 4:
                    raise
        return None

    @staticmethod
    def _account(cur: psycopg.Cursor, did: str) -> dict[str, Any]:
        cur.execute("INSERT INTO accounts (did) VALUES (%s) ON CONFLICT (did) DO NOTHING", (did,))
        cur.execute("SELECT * FROM accounts WHERE did = %s FOR UPDATE", (did,))
        return cur.fetchone()

    # ---- the platform's transitions -----------------------------------------------
    def deposit(self, did: str, amount: Decimal) -> Decimal:
        """Money paid in from outside: ``balance += x``, ``total_deposited += x``."""
        amount = _money(amount)

        def op(cur: psycopg.Cursor) -> Decimal:
            self._account(cur, did)
            cur.execute("UPDATE accounts SET balance = balance + %s, total_deposited = total_deposited + %s, "
                        "updated_at = now() WHERE did = %s", (amount, amount, did))
            return amount
        return self._tx(op)

    def withdraw(self, did: str, amount: Decimal) -> Decimal | None:
        """Money paid out, only if ``balance >= x``."""
        amount = _money(amount)

        def op(cur: psycopg.Cursor) -> Decimal | None:
            acc = self._account(cur, did)
            if acc["balance"] < amount:
                return None
            cur.execute("UPDATE accounts SET balance = balance - %s, total_withdrawn = total_withdrawn + %s, "
                        "updated_at = now() WHERE did = %s", (amount, amount, did))
            return amount
        return self._tx(op)

    def open_channel(self, payer: str, payee: str, deposit: Decimal, auction_id: str | None = None) -> str | None:
        """A channel funded from the payer's balance (needs ``balance >= d``); ledger ``deposit d``."""
        deposit = _money(deposit)
        channel_id = self._uuid()

        def op(cur: psycopg.Cursor) -> str | None:
            acc = self._account(cur, payer)
            if deposit <= 0 or acc["balance"] < deposit:
                return None
            cur.execute("UPDATE accounts SET balance = balance - %s, updated_at = now() WHERE did = %s",
                        (deposit, payer))
            cur.execute(
                "INSERT INTO payment_channels (id, payer_did, payee_did, auction_id, total_deposit, current_balance,"
                " state, sequence_number) VALUES (%s, %s, %s, %s, %s, %s, 'open', 0)",
                (channel_id, payer, payee, auction_id, deposit, deposit))
            cur.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, reason) "
                        "VALUES (%s, 'deposit', %s, 'open')", (channel_id, deposit))
            return channel_id
        opened = self._tx(op)
        if opened:
            self.channels[opened] = "open"
        return opened

    def lock_escrow(self, channel_id: str, amount: Decimal, task_id: str | None = None) -> str | None:
        """Lock ``a`` for a task (needs ``current_balance >= a``, not closed, nothing locked). Returns the task id."""
        amount = _money(amount)
        task = task_id or f"task-{self._uuid()}"

        def op(cur: psycopg.Cursor) -> str | None:
            cur.execute("SELECT * FROM payment_channels WHERE id = %s FOR UPDATE", (channel_id,))
            ch = cur.fetchone()
            if (ch is None or ch["state"] not in ("open",) or ch["escrowed_amount"] > 0 or amount <= 0
                    or ch["current_balance"] < amount):
                return None
            cur.execute(
                "UPDATE payment_channels SET current_balance = current_balance - %s, escrowed_amount = "
                "escrowed_amount + %s, task_id = %s, state = 'escrowed', escrow_released = false, "
                "sequence_number = sequence_number + 1, updated_at = now() WHERE id = %s",
                (amount, amount, task, channel_id))
            cur.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) "
                        "VALUES (%s, 'escrow', %s, %s)", (channel_id, amount, task))
            return task
        locked = self._tx(op)
        if locked:
            self.channels[channel_id] = "escrowed"
        return locked

    def release_escrow(self, channel_id: str, success: bool = True) -> Decimal | None:
        """Pay the escrow to the payee (``success``) or back to the channel; a second release is refused."""

        def op(cur: psycopg.Cursor) -> Decimal | None:
            cur.execute("SELECT * FROM payment_channels WHERE id = %s FOR UPDATE", (channel_id,))
            ch = cur.fetchone()
            if ch is None or ch["escrow_released"] or ch["escrowed_amount"] <= 0:
                return None
            e = ch["escrowed_amount"]
            if success:
                self._account(cur, ch["payee_did"])
                cur.execute("UPDATE accounts SET balance = balance + %s, updated_at = now() WHERE did = %s",
                            (e, ch["payee_did"]))
                cur.execute("UPDATE payment_channels SET total_settled = total_settled + %s WHERE id = %s",
                            (e, channel_id))
            else:
                cur.execute("UPDATE payment_channels SET current_balance = current_balance + %s WHERE id = %s",
                            (e, channel_id))
            cur.execute(
                "UPDATE payment_channels SET escrowed_amount = 0, escrow_released = true, state = 'open', "
                "task_id = NULL, sequence_number = sequence_number + 1, updated_at = now() WHERE id = %s",
                (channel_id,))
            cur.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) "
                        "VALUES (%s, %s, %s, %s)", (channel_id, "release" if success else "refund", e, ch["task_id"]))
            return e
        released = self._tx(op)
        if released is not None:
            self.channels[channel_id] = "open"
        return released

    def close_channel(self, channel_id: str) -> Decimal | None:
        """Return ``current_balance`` to the payer (refused while an escrow is locked). Returns the refund."""

        def op(cur: psycopg.Cursor) -> Decimal | None:
            cur.execute("SELECT * FROM payment_channels WHERE id = %s FOR UPDATE", (channel_id,))
            ch = cur.fetchone()
            if ch is None or ch["state"] == "closed" or ch["escrowed_amount"] > 0:
                return None
            refund = ch["current_balance"]
            self._account(cur, ch["payer_did"])
            cur.execute("UPDATE accounts SET balance = balance + %s, updated_at = now() WHERE did = %s",
                        (refund, ch["payer_did"]))
            cur.execute(
                "UPDATE payment_channels SET pending_refund = %s, current_balance = 0, state = 'closed', "
                "closed_at = now(), updated_at = now() WHERE id = %s", (refund, channel_id))
            cur.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount) "
                        "VALUES (%s, 'close', %s)", (channel_id, refund))
            return refund
        refunded = self._tx(op)
        if refunded is not None:
            self.channels[channel_id] = "closed"
        return refunded

    # ---- random traffic -------------------------------------------------------------
    def _pick(self, state: str) -> str | None:
        ids = [c for c, s in self.channels.items() if s == state]
        return self.rng.choice(ids) if ids else None

    def step(self) -> str:
        """One random, correct operation. Returns its name (``noop`` when the platform refused it)."""
        r = self.rng.random()
        if r < 0.12:
            self.deposit(self.rng.choice(self.users), self._amount("1", "500"))
            return "deposit"
        if r < 0.17:
            did = self.rng.choice(self.users + self.agents)
            return "withdraw" if self.withdraw(did, self._amount("0.00000001", "50")) is not None else "noop"
        if r < 0.32 or not self.channels:
            payer = self.rng.choice(self.users)
            if self.open_channel(payer, self.rng.choice(self.agents), self._amount("1", "100"),
                                 auction_id=self._uuid()) is None:
                self.deposit(payer, self._amount("100", "500"))
                return "deposit"
            return "open"
        if r < 0.57:
            cid = self._pick("open")
            if cid and self.lock_escrow(cid, self._amount("0.00000001", "20")):
                return "escrow"
            return "noop"
        if r < 0.90:
            cid = self._pick("escrowed")
            if cid and self.release_escrow(cid, success=self.rng.random() < 0.75) is not None:
                return "release"
            return "noop"
        cid = self._pick("open")
        return "close" if cid and self.close_channel(cid) is not None else "noop"

    def run(self, n: int) -> dict[str, int]:
        """``n`` random steps; returns how many of each operation ran."""
        done: dict[str, int] = {}
        for _ in range(n):
            op = self.step()
            done[op] = done.get(op, 0) + 1
        return done

    def settle_tasks(self, n: int, amount: Decimal = Decimal("1.5")) -> None:
        """``n`` tasks that succeed: escrow then release to the payee (the world the platform's formula gets wrong)."""
        payer, payee = self.users[0], self.agents[0]
        self.deposit(payer, amount * n + 10)
        cid = self.open_channel(payer, payee, amount * n + 5)
        assert cid is not None
        for _ in range(n):
            assert self.lock_escrow(cid, amount)
            assert self.release_escrow(cid, success=True) == _money(amount)


# ---- fault injection ----------------------------------------------------------------
# Each plants one invariant's violation, in one transaction, and returns the entity it broke.

class DeployedPayments:
    """The payment writes of the deployed platform, as its source does them (docs/invariants.md, "What the
    deployed platform really writes"), for the tests' real-platform scenarios:

    - ``open_channel``: a channel with total_deposit = current_balance = the amount, state ``open``, a
      literal placeholder ``payer_did``, no account debited and no ``deposit`` ledger row;
    - ``settle``: refused when the channel it reads is closed; else ``total_settled = amount`` (overwritten),
      ``current_balance = total_deposit - amount`` (negative above the deposit), ``state = closed``,
      ``closed_at = now()``, then one ``settlement`` row with no task_id; nothing credits the payee, and the
      two writes share no transaction;
    - ``racing_settles``: two settle calls that both read the channel open before either wrote: both writes
      land, the second overwrites ``total_settled``, two ``settlement`` rows stay.
    """

    PAYER = "payer_did"  # what the settle handler passes as the payer

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def open_channel(self, payee: str, amount: Decimal | int | str, auction_id: str | None = None) -> str:
        row = self.conn.execute(
            "INSERT INTO payment_channels (payer_did, payee_did, auction_id, total_deposit, current_balance, "
            "escrowed_amount, total_settled, pending_refund, state, sequence_number, escrow_released) "
            "VALUES (%s, %s, %s, %s, %s, 0, 0, 0, 'open', 0, false) RETURNING id",
            (self.PAYER, payee, auction_id, _money(amount), _money(amount))).fetchone()
        assert row is not None
        return str(row[0])

    def _write_settle(self, channel_id: str, amount: Decimal) -> None:
        self.conn.execute("UPDATE payment_channels SET total_settled = %s, current_balance = total_deposit - %s, "
                          "state = 'closed', closed_at = now(), updated_at = now() WHERE id = %s",
                          (amount, amount, channel_id))
        self.conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, reason, metadata) "
                          "VALUES (%s, 'settlement', %s, 'channel settled', '{}')", (channel_id, amount))

    def settle(self, channel_id: str, amount: Decimal | int | str) -> bool:
        """One settle call; False when the platform refuses it (the channel it reads is already closed)."""
        state = self.conn.execute("SELECT state FROM payment_channels WHERE id = %s", (channel_id,)).fetchone()
        if state is None or state[0] == "closed":
            return False
        self._write_settle(channel_id, _money(amount))
        return True

    def racing_settles(self, channel_id: str, first: Decimal | int | str, second: Decimal | int | str) -> None:
        """Two concurrent settle calls: both passed the closed check before either wrote."""
        state = self.conn.execute("SELECT state FROM payment_channels WHERE id = %s", (channel_id,)).fetchone()
        assert state is not None and state[0] != "closed"
        self._write_settle(channel_id, _money(first))
        self._write_settle(channel_id, _money(second))


def _one(conn: psycopg.Connection, sql: str, what: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql)
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no {what} to plant this fault on: run some traffic first")
    return row


def _channel(conn: psycopg.Connection, where: str, what: str, newest: bool = True) -> dict[str, Any]:
    order = "DESC" if newest else "ASC"
    return _one(conn, f"SELECT * FROM payment_channels WHERE {where} ORDER BY updated_at {order}, id LIMIT 1 "
                      "FOR UPDATE", what)


_NEEDS = {
    "open": "SELECT 1 FROM payment_channels WHERE state = 'open' AND escrowed_amount = 0 AND current_balance >= 1",
    "escrowed": "SELECT 1 FROM payment_channels WHERE state = 'escrowed' AND escrowed_amount > 0",
    "released": "SELECT 1 FROM channel_transactions WHERE transaction_type = 'release' AND task_id IS NOT NULL",
    "account": "SELECT 1 FROM accounts WHERE total_deposited - total_withdrawn >= 1 AND balance >= 1",
}


def _ensure(conn: psycopg.Connection, need: str) -> None:
    """Make what a fault needs with correct transitions when the world has none yet (e.g. a fresh demo)."""
    if conn.execute(_NEEDS[need] + " LIMIT 1").fetchone():
        return
    seed = conn.execute("SELECT count(*) FROM payment_channels").fetchone()[0]  # new ids as the world grows
    sim = PaymentSimulator(conn, seed=seed, users=1, agents=1, prefix="did:sim:fault")
    sim.deposit(sim.users[0], Decimal("100"))
    if need == "account":
        return
    cid = sim.open_channel(sim.users[0], sim.agents[0], Decimal("50"))
    if need in ("escrowed", "released"):
        sim.lock_escrow(cid, Decimal("5"))
    if need == "released":
        sim.release_escrow(cid, success=True)


def money_from_nowhere(conn: psycopg.Connection) -> str:
    """A channel's spendable balance grows by 5 with no deposit (``channel_conservation``)."""
    _ensure(conn, 'open')
    with conn.transaction():
        ch = _channel(conn, "state <> 'closed'", "open channel")
        conn.execute("UPDATE payment_channels SET current_balance = current_balance + 5, updated_at = now() "
                     "WHERE id = %s", (ch["id"],))
    return str(ch["id"])


def one_unit_leak(conn: psycopg.Connection) -> str:
    """A release whose ledger row says e but which settles e - 0.00000001, the unit staying on the channel
    (a rounding bug: the channel stays conserved, only the ledger disagrees: ``ledger_reconciliation``)."""
    _ensure(conn, 'open')
    with conn.transaction():
        ch = _channel(conn, "state = 'open' AND current_balance >= 1 AND escrowed_amount = 0", "open channel")
        e = Decimal("1")
        conn.execute(
            "UPDATE payment_channels SET current_balance = current_balance - %s + %s, total_settled = total_settled"
            " + %s - %s, sequence_number = sequence_number + 2, updated_at = now() WHERE id = %s",
            (e, UNIT, e, UNIT, ch["id"]))
        # The payee is credited as the platform credits it, creating its account on its first payment.
        PaymentSimulator._account(conn.cursor(), ch["payee_did"])
        conn.execute("UPDATE accounts SET balance = balance + %s - %s, updated_at = now() WHERE did = %s",
                     (e, UNIT, ch["payee_did"]))
        conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) VALUES "
                     "(%s, 'escrow', %s, 'task-leak'), (%s, 'release', %s, 'task-leak')", (ch["id"], e, ch["id"], e))
    return str(ch["id"])


def double_release(conn: psycopg.Connection) -> str:
    """A second ``release`` row for an escrow already released (two concurrent release calls: ``double_release``)."""
    _ensure(conn, 'released')
    with conn.transaction():
        row = _one(conn, "SELECT channel_id, amount, task_id FROM channel_transactions WHERE transaction_type = "
                         "'release' AND task_id IS NOT NULL ORDER BY created_at DESC, id LIMIT 1", "released escrow")
        conn.execute("SELECT 1 FROM payment_channels WHERE id = %s FOR UPDATE", (row["channel_id"],))
        conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) "
                     "VALUES (%s, 'release', %s, %s)", (row["channel_id"], row["amount"], row["task_id"]))
        conn.execute("UPDATE payment_channels SET updated_at = now() WHERE id = %s", (row["channel_id"],))
    return str(row["channel_id"])


def overdrawn_escrow(conn: psycopg.Connection) -> str:
    """An escrow of ``current_balance + 1`` locked without the balance check: the balance goes to -1
    (``channel_non_negative``)."""
    _ensure(conn, 'open')
    with conn.transaction():
        ch = _channel(conn, "state = 'open' AND escrowed_amount = 0", "open channel")
        a = ch["current_balance"] + 1
        conn.execute("UPDATE payment_channels SET current_balance = current_balance - %s, escrowed_amount = %s, "
                     "task_id = 'task-overdrawn', state = 'escrowed', escrow_released = false, "
                     "sequence_number = sequence_number + 1, updated_at = now() WHERE id = %s", (a, a, ch["id"]))
        conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount, task_id) "
                     "VALUES (%s, 'escrow', %s, 'task-overdrawn')", (ch["id"], a))
    return str(ch["id"])


def negative_withdrawal(conn: psycopg.Connection) -> str:
    """An account's ``total_withdrawn`` booked as -1 (a refund written as a negative withdrawal) with the
    deposits lowered to match, so balances still add up (``account_non_negative``). Returns the DID."""
    _ensure(conn, 'account')
    with conn.transaction():
        acc = _one(conn, "SELECT * FROM accounts WHERE total_deposited - total_withdrawn >= 1 "
                         "ORDER BY updated_at DESC, did LIMIT 1 FOR UPDATE", "account with deposits")
        shift = acc["total_withdrawn"] + 1
        conn.execute("UPDATE accounts SET total_withdrawn = total_withdrawn - %s, total_deposited = "
                     "total_deposited - %s, updated_at = now() WHERE did = %s", (shift, shift, acc["did"]))
    return acc["did"]


def close_with_escrow_locked(conn: psycopg.Connection) -> str:
    """A channel closed while an escrow is still locked (``closed_channel_drained``; necessarily also
    ``escrow_state``: money locked on a channel that is not escrowed)."""
    _ensure(conn, 'escrowed')
    with conn.transaction():
        ch = _channel(conn, "state = 'escrowed' AND escrowed_amount > 0", "escrowed channel")
        conn.execute("UPDATE accounts SET balance = balance + %s, updated_at = now() WHERE did = %s",
                     (ch["current_balance"], ch["payer_did"]))
        conn.execute("UPDATE payment_channels SET pending_refund = current_balance, current_balance = 0, "
                     "state = 'closed', closed_at = now(), updated_at = now() WHERE id = %s", (ch["id"],))
        conn.execute("INSERT INTO channel_transactions (channel_id, transaction_type, amount) "
                     "VALUES (%s, 'close', %s)", (ch["id"], ch["current_balance"]))
    return str(ch["id"])


def escrowed_without_lock(conn: psycopg.Connection) -> str:
    """A channel in state ``escrowed`` with nothing locked (``escrow_state``)."""
    _ensure(conn, 'open')
    with conn.transaction():
        ch = _channel(conn, "state = 'open' AND escrowed_amount = 0", "open channel")
        conn.execute("UPDATE payment_channels SET state = 'escrowed', updated_at = now() WHERE id = %s", (ch["id"],))
    return str(ch["id"])


def account_credited_from_nowhere(conn: psycopg.Connection) -> str:
    """An account's balance grows by 5 with no deposit nor settlement (``account_reconciliation``;
    necessarily also ``global_conservation``). Returns the DID."""
    _ensure(conn, 'account')
    with conn.transaction():
        acc = _one(conn, "SELECT * FROM accounts ORDER BY updated_at DESC, did LIMIT 1 FOR UPDATE", "account")
        conn.execute("UPDATE accounts SET balance = balance + 5, updated_at = now() WHERE did = %s", (acc["did"],))
    return acc["did"]


def sequence_going_back(conn: psycopg.Connection) -> str:
    """A channel's ``sequence_number`` decreases by one (a replayed or reordered write: ``sequence_regression``;
    seen only by a checker that observed the channel before)."""
    _ensure(conn, 'released')
    with conn.transaction():
        # The least recently written channel: not one another fault just moved forward again.
        ch = _channel(conn, "sequence_number >= 1", "channel with a sequence number", newest=False)
        conn.execute("UPDATE payment_channels SET sequence_number = sequence_number - 1, updated_at = now() "
                     "WHERE id = %s", (ch["id"],))
    return str(ch["id"])


def global_leak(conn: psycopg.Connection) -> str:
    """0.00000001 paid out of an account without recording a withdrawal: money leaves the system unbooked
    (``global_conservation``; necessarily also ``account_reconciliation`` of that account). Returns ``global``."""
    _ensure(conn, 'account')
    with conn.transaction():
        acc = _one(conn, "SELECT * FROM accounts WHERE balance >= 0.00000001 ORDER BY updated_at DESC, did "
                         "LIMIT 1 FOR UPDATE", "account with a balance")
        conn.execute("UPDATE accounts SET balance = balance - %s, updated_at = now() WHERE did = %s",
                     (UNIT, acc["did"]))
    return "global"


@dataclass(frozen=True)
class Fault:
    invariant: str                    # the invariant this fault breaks
    inject: Callable[[psycopg.Connection], str]
    also: frozenset[str] = frozenset()  # invariants that necessarily fire with it (other entities possible)


FAULTS: dict[str, Fault] = {
    "money_from_nowhere": Fault("channel_conservation", money_from_nowhere,
                                frozenset({"ledger_reconciliation", "global_conservation"})),
    "overdrawn_escrow": Fault("channel_non_negative", overdrawn_escrow),
    "negative_withdrawal": Fault("account_non_negative", negative_withdrawal),
    "one_unit_leak": Fault("ledger_reconciliation", one_unit_leak),
    "close_with_escrow_locked": Fault("closed_channel_drained", close_with_escrow_locked, frozenset({"escrow_state"})),
    "escrowed_without_lock": Fault("escrow_state", escrowed_without_lock),
    "double_release": Fault("double_release", double_release, frozenset({"ledger_reconciliation"})),
    "sequence_going_back": Fault("sequence_regression", sequence_going_back),
    "account_credited_from_nowhere": Fault("account_reconciliation", account_credited_from_nowhere,
                                           frozenset({"global_conservation"})),
    "global_leak": Fault("global_conservation", global_leak, frozenset({"account_reconciliation"})),
}


def inject_fault(conn: psycopg.Connection, name: str) -> str:
    """Plant the fault ``name`` (a key of ``FAULTS``) and return the entity id it broke."""
    try:
        fault = FAULTS[name]
    except KeyError:
        raise KeyError(f"unknown payment fault {name!r}; known: {', '.join(FAULTS)}") from None
    return fault.inject(conn)
