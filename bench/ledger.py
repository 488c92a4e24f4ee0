"""The ledger's balance check at a million entries, on PostgreSQL.

Loads a ledger into a database of its own (``soko_bench_ledger``, dropped and created
again) with COPY through asyncpg: captures of payments split across ``BENCH_SELLERS``
sellers (one to three orders each, commission at each seller's rate, sometimes a part
for suspense), partial refunds of some orders (commission given back in proportion) and
payouts within each seller's balance, until ``BENCH_LEDGER_ENTRIES`` entries. The
loader keeps its own tally of every seller's balance. Then it times, through the
ledger's own functions and sessions:

* ``verify_ledger`` (two set-based statements over every entry), ``BENCH_REPEAT`` times;
* ``seller_balance`` for the seller with the most entries;
* the first page, and a page 25 pages deep, of that seller's history (20 entries, the
  keyset the ``/seller/balance`` route uses).

Invariants checked: the check finds the ledger balanced, its entry count is the loaded
count, the trial balance is zero in each currency, the seller's balance equals the
loader's tally, the history pages are the seller's newest entries in order; then one
entry is slipped in behind the ledger's back and the check must name exactly its
transaction (and is timed again).

    .venv/bin/python -m bench ledger

Settings: ``BENCH_LEDGER_ENTRIES`` (1000000), ``BENCH_SELLERS`` (1000), ``BENCH_REPEAT``
(5), ``BENCH_DATABASE_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_ledger``; a database whose name
starts with ``soko_bench`` is dropped and created), ``BENCH_KEEP_DATABASE=1`` to keep it.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import loadgen

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_ledger"
CURRENCIES = ("KES", "NGN")
PAGE_SIZE = 20
DEEP_PAGE = 25
COPY_BATCH = 50_000

ENTRY_COLUMNS = (
    "id",
    "transaction_id",
    "account_id",
    "amount_minor",
    "currency",
    "payment_id",
    "order_id",
    "rate_bps",
    "created_at",
)
TRANSACTION_COLUMNS = ("id", "kind", "reference", "currency", "memo", "actor_id", "created_at")
PAYOUT_COLUMNS = (
    "id",
    "seller_id",
    "amount_minor",
    "currency",
    "reference",
    "note",
    "recorded_by",
    "created_at",
    "transaction_id",
)


@dataclass
class Config:
    entries: int = 1_000_000
    sellers: int = 1_000
    repeat: int = 5
    url: str = DEFAULT_DATABASE_URL
    keep: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            entries=int(env("BENCH_LEDGER_ENTRIES", "1000000")),
            sellers=int(env("BENCH_SELLERS", "1000")),
            repeat=int(env("BENCH_REPEAT", "5")),
            url=env("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            keep=env("BENCH_KEEP_DATABASE") == "1",
        )


@dataclass
class Loaded:
    entries: int = 0
    transactions: int = 0
    payouts: int = 0
    # (seller, currency) -> what the marketplace owes, tallied by the loader.
    owed: dict[tuple[uuid.UUID, str], int] = field(default_factory=dict)
    # seller -> entries on its accounts
    seller_entries: dict[uuid.UUID, int] = field(default_factory=dict)


@dataclass
class Outcome:
    invariants_held: bool
    figures: dict[str, float]


# -- loading ---------------------------------------------------------------------------------


class _Loader:
    """Generates balanced transactions and COPYs them in batches."""

    def __init__(self, connection: Any, sellers: list[uuid.UUID], rng: random.Random) -> None:
        from soko.platform.ids import uuid7

        self.uuid7 = uuid7
        self.connection = connection
        self.sellers = sellers
        self.rng = rng
        self.rates = {seller: rng.choice((500, 1000, 1000, 1500)) for seller in sellers}
        self.accounts: dict[tuple[str, str], uuid.UUID] = {}
        self.account_rows: list[tuple[Any, ...]] = []
        self.transactions: list[tuple[Any, ...]] = []
        self.entries: list[tuple[Any, ...]] = []
        self.payouts: list[tuple[Any, ...]] = []
        self.loaded = Loaded()
        # Spread over a year, so the history's time order means something.
        self.clock = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
        # order -> (seller, currency, payment, provider, gross, commission, refunded)
        self.refundable: list[list[Any]] = []

    def account(self, code: str, kind: str, currency: str, seller: uuid.UUID | None = None) -> Any:
        key = (code, currency)
        found = self.accounts.get(key)
        if found is None:
            found = self.accounts[key] = self.uuid7()
            self.account_rows.append((found, code, kind, seller, currency, 0, self.clock))
        return found

    def seller_account(self, seller: uuid.UUID, currency: str) -> Any:
        return self.account(f"seller:{seller}", "seller", currency, seller)

    def post(self, kind: str, reference: str, currency: str, lines: list[tuple[Any, ...]]) -> Any:
        """``lines``: (account, amount, payment, order, rate, seller or None)."""
        assert sum(line[1] for line in lines) == 0
        self.clock += dt.timedelta(milliseconds=self.rng.randint(1, 60))
        transaction_id = self.uuid7()
        self.transactions.append(
            (transaction_id, kind, reference, currency, None, None, self.clock)
        )
        for account, amount, payment, order, rate, seller in lines:
            if amount == 0:
                continue
            self.entries.append(
                (self.uuid7(), transaction_id, account, amount, currency, payment, order, rate,
                 self.clock)
            )  # fmt: skip
            self.loaded.entries += 1
            if seller is not None:
                key = (seller, currency)
                self.loaded.owed[key] = self.loaded.owed.get(key, 0) - amount
                self.loaded.seller_entries[seller] = self.loaded.seller_entries.get(seller, 0) + 1
        self.loaded.transactions += 1
        return transaction_id

    def capture(self) -> None:
        rng = self.rng
        currency = CURRENCIES[0] if rng.random() < 0.9 else CURRENCIES[1]
        provider = rng.choice(("sandbox", "stripe", "paystack", "flutterwave"))
        payment = self.uuid7()
        shares = [(rng.choice(self.sellers), self.uuid7(), rng.randint(500, 50_000))
                  for _ in range(rng.choice((1, 1, 2, 3)))]  # fmt: skip
        extra = rng.randint(1, 5_000) if rng.random() < 0.05 else 0
        amount = sum(gross for _, _, gross in shares) + extra
        revenue = self.account("revenue:commission", "revenue", currency)
        lines: list[tuple[Any, ...]] = [
            (self.account(f"clearing:{provider}", "clearing", currency), amount, payment, None,
             None, None)
        ]  # fmt: skip
        for seller, order, gross in shares:
            rate = self.rates[seller]
            commission = gross * rate // 10_000
            lines.append((self.seller_account(seller, currency), commission - gross, payment,
                          order, rate, seller))  # fmt: skip
            lines.append((revenue, -commission, payment, order, rate, None))
            if rng.random() < 0.1:
                self.refundable.append([seller, currency, payment, provider, order, gross,
                                        commission, 0])  # fmt: skip
        if extra:
            lines.append((self.account("suspense:payments", "suspense", currency), -extra,
                          payment, None, None, None))  # fmt: skip
        self.post("capture", str(payment), currency, lines)

    def refund(self) -> None:
        item = self.refundable.pop(self.rng.randrange(len(self.refundable)))
        seller, currency, payment, provider, order, gross, commission, refunded = item
        amount = self.rng.randint(1, gross - refunded)
        given_back = commission * (refunded + amount) // gross - commission * refunded // gross
        self.post(
            "refund",
            str(self.uuid7()),
            currency,
            [
                (self.account(f"clearing:{provider}", "clearing", currency), -amount, payment,
                 None, None, None),
                (self.seller_account(seller, currency), amount - given_back, payment, order,
                 None, seller),
                (self.account("revenue:commission", "revenue", currency), given_back, payment,
                 order, None, None),
            ],
        )  # fmt: skip

    def payout(self) -> None:
        seller = self.rng.choice(self.sellers)
        currency = CURRENCIES[0]
        owed = self.loaded.owed.get((seller, currency), 0)
        if owed < 1_000:
            return
        amount = self.rng.randint(1, owed // 2)
        payout_id = self.uuid7()
        transaction_id = self.post(
            "payout",
            str(payout_id),
            currency,
            [
                (self.seller_account(seller, currency), amount, None, None, None, seller),
                (self.account("payouts:sent", "payouts", currency), -amount, None, None, None,
                 None),
            ],
        )  # fmt: skip
        self.payouts.append((payout_id, seller, amount, currency, f"BANK-{payout_id.hex}",
                             None, None, self.clock, transaction_id))  # fmt: skip
        self.loaded.payouts += 1

    async def flush(self) -> None:
        copy = self.connection.copy_records_to_table
        if self.account_rows:
            await copy(
                "payments_ledger_accounts",
                records=self.account_rows,
                columns=("id", "code", "kind", "seller_id", "currency", "version", "created_at"),
            )
            self.account_rows = []
        await copy(
            "payments_ledger_transactions", records=self.transactions, columns=TRANSACTION_COLUMNS
        )
        await copy("payments_ledger_entries", records=self.entries, columns=ENTRY_COLUMNS)
        if self.payouts:
            await copy("payments_payouts", records=self.payouts, columns=PAYOUT_COLUMNS)
        self.transactions, self.entries, self.payouts = [], [], []

    async def load(self, target: int) -> Loaded:
        rng = self.rng
        while self.loaded.entries < target:
            roll = rng.random()
            if roll < 0.08 and self.refundable:
                self.refund()
            elif roll < 0.16:
                self.payout()
            else:
                self.capture()
            if len(self.entries) >= COPY_BATCH:
                await self.flush()
        await self.flush()
        return self.loaded


async def load_ledger(url: str, config: Config, *, seed: int = 11) -> Loaded:
    """The schema from the models, then the ledger, COPYed through asyncpg."""
    import asyncpg

    from soko.app import load_models
    from soko.platform.db import create_engine
    from soko.platform.ids import uuid7
    from soko.platform.schema import create_current_schema

    load_models()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(create_current_schema)
    finally:
        await engine.dispose()
    rng = random.Random(seed)
    sellers = [uuid7() for _ in range(config.sellers)]
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        loaded = await _Loader(connection, sellers, rng).load(config.entries)
        # The visibility map makes the check an index-only scan, as on a live database
        # that autovacuum keeps up with; the statistics give the planner the real sizes.
        await connection.execute("VACUUM ANALYZE payments_ledger_entries")
        await connection.execute("VACUUM ANALYZE payments_ledger_transactions")
        await connection.execute("VACUUM ANALYZE payments_ledger_accounts")
    finally:
        await connection.close()
    return loaded


# -- measuring -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def _timed(call: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await call()
    return result, time.perf_counter() - started


async def main(_argv: list[str]) -> None:
    await run(Config.from_env())


async def run(config: Config) -> Outcome:
    from sqlalchemy import insert, select

    from soko.payments import ledger
    from soko.payments.ledger_models import LedgerAccount, LedgerEntry
    from soko.platform.db import Database, create_engine
    from soko.platform.ids import uuid7
    from soko.platform.pagination import Keyset, PageRequest, SortKey

    url = config.url
    if not url.startswith("postgresql"):
        raise SystemExit("the ledger benchmark runs on PostgreSQL (BENCH_DATABASE_URL)")
    print(
        f"setup         PostgreSQL database {loadgen.database_name(url)}, {os.cpu_count()} "
        f"cores; {loadgen.load_average()}"
    )
    await loadgen.recreate_database(url)
    held: list[tuple[str, bool]] = []
    figures: dict[str, float] = {}
    db: Database | None = None
    try:
        started = time.perf_counter()
        loaded = await load_ledger(url, config)
        load_seconds = time.perf_counter() - started
        print(
            f"ledger        {loaded.entries} entries in {loaded.transactions} transactions, "
            f"{config.sellers} sellers, {loaded.payouts} payouts; loaded with COPY and "
            f"vacuumed in {load_seconds:.1f} s"
        )
        db = Database(create_engine(url))

        async def check() -> ledger.LedgerCheck:
            assert db is not None
            async with db.transaction(read_only=True) as session:
                return await ledger.verify_ledger(session)

        await check()  # warm the cache: the figure is for a database in use
        runs: list[float] = []
        result: ledger.LedgerCheck | None = None
        for _ in range(max(config.repeat, 1)):
            result, seconds = await _timed(check)
            runs.append(seconds)
        assert result is not None
        figures["verify_median"] = statistics.median(runs)
        figures["verify_min"] = min(runs)
        print(
            f"verify_ledger {_ms(statistics.median(runs))} median, {_ms(min(runs))} best of "
            f"{len(runs)} ({loaded.entries / statistics.median(runs) / 1e6:.2f} M entries/s)"
        )
        held.append(("the check finds the ledger balanced", result.balanced))
        held.append(
            (f"it counted every entry ({result.entries})", result.entries == loaded.entries)
        )
        held.append(
            ("the trial balance is zero per currency", set(result.trial_balance.values()) == {0})
        )

        seller = max(loaded.seller_entries, key=loaded.seller_entries.__getitem__)

        async def balance() -> dict[str, int]:
            assert db is not None
            async with db.transaction(read_only=True) as session:
                return await ledger.seller_balance(session, seller)

        await balance()
        balances, seconds = await _timed(balance)
        figures["seller_balance"] = seconds
        expected = {c: v for (s, c), v in loaded.owed.items() if s == seller}
        print(
            f"seller_balance{_ms(seconds)} (the seller with the most entries: "
            f"{loaded.seller_entries[seller]})"
        )
        held.append(("the seller's balance is the loader's tally", balances == expected))

        listing = Keyset(
            f"payments.balance:{seller}",
            SortKey(LedgerEntry.created_at, descending=True),
            id_column=LedgerEntry.id,
        )
        key = b"bench-cursor-key-bench-cursor-key"

        async def page(cursor: str | None) -> tuple[list[Any], str | None]:
            assert db is not None
            request = PageRequest(limit=PAGE_SIZE, cursor=cursor, signing_key=key)
            async with db.transaction(read_only=True) as session:
                return await listing.fetch(session, ledger.seller_history(seller), request)

        await page(None)
        (first, cursor), first_seconds = await _timed(lambda: page(None))
        walked = list(first)
        pages, deep_seconds = 1, first_seconds
        while cursor is not None and pages < DEEP_PAGE:
            (rows, next_cursor), deep_seconds = await _timed(functools.partial(page, cursor))
            walked.extend(rows)
            cursor, pages = next_cursor, pages + 1
        figures["history_first"] = first_seconds
        figures["history_deep"] = deep_seconds
        print(
            f"history page  {_ms(first_seconds)} first, {_ms(deep_seconds)} page {pages} "
            f"({PAGE_SIZE} entries a page)"
        )
        async with db.transaction(read_only=True) as session:
            newest = (
                await session.execute(
                    ledger.seller_history(seller)
                    .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
                    .limit(len(walked))
                )
            ).all()
        held.append(
            (
                "the history pages are the seller's newest entries in order",
                [row.id for row in walked] == [row.id for row in newest] and len(walked) > 0,
            )
        )

        # One entry behind the ledger's back: the check must name its transaction.
        async with db.transaction() as session:
            victim = result_transaction = await session.scalar(
                select(LedgerEntry.transaction_id).order_by(LedgerEntry.created_at).limit(1)
            )
            account = await session.scalar(select(LedgerAccount.id).limit(1))
            await session.execute(
                insert(LedgerEntry).values(
                    id=uuid7(),
                    transaction_id=victim,
                    account_id=account,
                    amount_minor=1,
                    currency=CURRENCIES[0],
                    created_at=dt.datetime.now(dt.UTC),
                )
            )
        broken, seconds = await _timed(check)
        figures["verify_broken"] = seconds
        print(f"verify_ledger {_ms(seconds)} with one unbalanced transaction slipped in")
        held.append(
            (
                "the check names exactly the unbalanced transaction",
                not broken.balanced
                and broken.unbalanced_transaction_ids == (result_transaction,)
                and broken.trial_balance[CURRENCIES[0]] == 1,
            )
        )
    finally:
        if db is not None:
            await db.dispose()
        if not config.keep:
            await loadgen.drop_database(url)
    print(f"{loadgen.load_average()}")
    for name, ok in held:
        print(f"invariant     {'HELD  ' if ok else 'BROKEN'} {name}")
    return Outcome(all(ok for _, ok in held), figures)
