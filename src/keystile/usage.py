"""UsageRecorder: ``last_used_at`` written in batches, never on the request path.

``touch`` is a dict write (latest timestamp per key wins). One background task flushes
the batch every ``flush_interval`` seconds, or as soon as ``flush_max`` keys are
pending, in one statement (Postgres) or one transaction (SQLite), and once more on
shutdown. A failed flush keeps its batch, merged with newer touches, and retries with
capped exponential backoff; memory is bounded by the number of distinct keys touched.

It also carries quota uses: ``count_use`` is another dict write, and the same
transaction that writes ``last_used_at`` takes each budget's uses from its remaining
quota and returns what is left, which listeners (the limit enforcer) learn after every
flush: that is how a process hears of the uses of every other process. Each batch of
uses is named; a batch whose write failed is retried as it was, under its name, so a
write that committed before its acknowledgement was lost is not taken twice.

And it counts, per key and per minute, authenticated requests (``touch``: one more
integer add in the same call) and attempts refused against a key id (``reject``: wrong
secret, revoked, expired, disabled). The counts of the current minute are per-key
integers; at each minute boundary, and at each flush, they are folded into
``(key id, minute)`` rows that the same flush adds to the store's usage table in one
statement (Postgres) or one transaction (SQLite). A failed write keeps its rows and
retries with the touches; at most ``max_usage_rows`` rows wait, the oldest minutes
dropped (and counted) past that, so a long outage cannot grow memory without bound.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Protocol

import anyio

from .stores.protocol import KeyStore
from .stores.records import QuotaState

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_FLUSH_MAX",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_MAX_USAGE_ROWS",
    "QuotaListener",
    "UsageRecorder",
    "UsageTable",
]


class UsageTable(Protocol):
    """What the recorder reads of a table that counts uses itself (the compiled cache's)."""

    count_uses: bool
    minute_end: float
    pending_limit: int

    @property
    def pending(self) -> int: ...

    def harvest(self) -> list[tuple[str, float, int]]: ...


#: Called after each flush that wrote uses with the quota state the store returned.
QuotaListener = Callable[[Mapping[str, QuotaState]], None]

logger = logging.getLogger("keystile.usage")

#: Seconds between flushes: how stale ``last_used_at`` may be in the store.
DEFAULT_FLUSH_INTERVAL = 5.0
#: Pending keys that trigger an early flush.
DEFAULT_FLUSH_MAX = 1_000
#: Seconds one flush may take before it counts as failed.
DEFAULT_FLUSH_TIMEOUT = 10.0
#: Longest wait between retries while the store keeps failing.
DEFAULT_MAX_BACKOFF = 60.0
#: ``(key, minute)`` usage rows kept while the store is unreachable (about 100 bytes
#: each); past this the oldest minutes are dropped and counted in ``usage_dropped``.
DEFAULT_MAX_USAGE_ROWS = 100_000
#: The counts a recorder keeps under their ``KeystileStats`` names.
_COUNTS = ("flushes", "flush_failures", "touches_written", "usage_rows_written", "usage_dropped")


class UsageRecorder:
    def __init__(
        self,
        store: KeyStore,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        flush_max: int = DEFAULT_FLUSH_MAX,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        max_usage_rows: int = DEFAULT_MAX_USAGE_ROWS,
        count_usage: bool = True,
    ) -> None:
        if flush_interval <= 0 or flush_max < 1:
            raise ValueError("flush_interval must be positive and flush_max at least 1")
        self.store = store
        self.flush_interval = flush_interval
        #: The compiled cache's table, which counts the uses of plain cache hits itself.
        self._table: UsageTable | None = None
        self._flush_max = flush_max
        self.flush_timeout = flush_timeout
        self.max_backoff = max_backoff
        self.flushes = 0
        self.flush_failures = 0
        self.touches_written = 0
        self._pending: dict[str, float] = {}
        #: The batch a flush is writing right now: still pending until it lands.
        self._in_flight: dict[str, float] = {}
        self._wakeup: anyio.Event | None = None
        #: Quota uses counted and not yet written, and those a flush is writing.
        self._uses: dict[str, int] = {}
        self._uses_in_flight: dict[str, int] = {}
        #: A batch of uses whose write failed, perhaps after it committed: its name and
        #: uses, retried as they are (``touch_many(batch=)`` takes a replay once).
        self._unacknowledged: tuple[str, dict[str, int]] | None = None
        self._quota_listeners: list[QuotaListener] = []
        #: Per-key counts of the minute starting at ``_minute`` (epoch seconds), and the
        #: folded ``(key id, minute) -> [requests, rejected]`` rows awaiting a flush.
        self.max_usage_rows = max_usage_rows
        self.usage_rows_written = 0
        self.usage_dropped = 0
        self._requests: defaultdict[str, int] = defaultdict(int)
        self._rejected: defaultdict[str, int] = defaultdict(int)
        self._minute = 0
        self._minute_end = -math.inf
        self._counts: dict[tuple[str, int], list[int]] = {}
        self.count_usage = count_usage

    @property
    def flush_max(self) -> int:
        """Pending keys that trigger an early flush."""
        return self._flush_max

    @flush_max.setter
    def flush_max(self, flush_max: int) -> None:
        self._flush_max = flush_max
        if self._table is not None:
            self._table.pending_limit = flush_max

    def attach(self, table: UsageTable) -> None:
        """Take the uses ``table`` counts (the compiled hit path counts a plain hit's use in
        the cache's table, with no dict write): harvested into this recorder at each minute
        boundary, each flush, and whenever ``pending`` is read. The table declines to count
        past the current minute or past ``flush_max`` pending keys, so the request that
        finds it so comes through ``touch``, which harvests (and wakes the flush)."""
        self._table = table
        table.pending_limit = self.flush_max
        table.minute_end = self._minute_end if self.count_usage else math.inf
        table.count_uses = True

    def _collect(self) -> None:
        """Move the uses the table counted into the pending touches and this minute's
        request counts."""
        table = self._table
        if table is None:
            return
        pending, requests, counting = self._pending, self._requests, self.count_usage
        for key_id, at, uses in table.harvest():
            if at > pending.get(key_id, -math.inf):
                pending[key_id] = at
            if counting:
                requests[key_id] += uses

    def _pending_keys(self) -> int:
        """Keys pending here and in the table (a key in both counted twice: a bound)."""
        table = self._table
        return len(self._pending) + (table.pending if table is not None else 0)

    @property
    def pending(self) -> int:
        """Keys whose latest use is not in the store yet (including a flush under way)."""
        self._collect()
        if not self._in_flight:
            return len(self._pending)
        return len(self._pending.keys() | self._in_flight.keys())

    @property
    def count_usage(self) -> bool:
        """Whether ``touch`` counts requests per key and minute (``reject`` always counts)."""
        return "touch" not in self.__dict__

    @count_usage.setter
    def count_usage(self, on: bool) -> None:
        # The switch costs the hit path nothing: an instance attribute shadows the method.
        if on:
            self.__dict__.pop("touch", None)
        else:
            self.__dict__["touch"] = self._touch_uncounted
        if self._table is not None:
            self._table.minute_end = self._minute_end if on else math.inf

    @property
    def pending_usage(self) -> int:
        """Usage rows (key, minute) counted and not yet in the store."""
        self._collect()
        return len(self._counts) + len(self._requests.keys() | self._rejected.keys())

    def stats(self) -> dict[str, int]:
        """This recorder's numbers, under their ``KeystileStats`` names."""
        counts = {name: getattr(self, name) for name in _COUNTS}
        return {"pending_touches": self.pending, "usage_pending": self.pending_usage, **counts}

    def touch(self, key_id: str, at: float) -> None:
        """Record a use of ``key_id`` at wall-clock epoch ``at``, and count the request in
        its minute. No I/O. Runs on every request: the pending count can only reach
        ``flush_max`` when a key is added, so only then is it checked."""
        pending = self._pending
        last = pending.get(key_id)
        if last is None:
            pending[key_id] = at
            if self._pending_keys() >= self.flush_max and self._wakeup is not None:
                self._wakeup.set()
        elif at > last:
            pending[key_id] = at
        if at >= self._minute_end:
            self._start_minute(at)
        self._requests[key_id] += 1

    def _touch_uncounted(self, key_id: str, at: float) -> None:
        """``touch`` with ``count_usage=False``: ``last_used_at`` alone."""
        pending = self._pending
        last = pending.get(key_id)
        if last is None:
            pending[key_id] = at
            if self._pending_keys() >= self.flush_max and self._wakeup is not None:
                self._wakeup.set()
        elif at > last:
            pending[key_id] = at

    def reject(self, key_id: str, at: float) -> None:
        """Count an attempt refused against ``key_id`` (an existing key) at epoch ``at``."""
        if at >= self._minute_end:
            self._start_minute(at)
        self._rejected[key_id] += 1

    def _start_minute(self, at: float) -> None:
        """Fold the ending minute's counts into rows and start counting the minute of ``at``."""
        self._fold()
        minute = int(at // 60) * 60
        self._minute = minute
        self._minute_end = minute + 60.0
        if self._table is not None and self.count_usage:
            self._table.minute_end = self._minute_end

    def _fold(self) -> None:
        self._collect()
        minute, counts = self._minute, self._counts
        if self._requests:
            requests, self._requests = self._requests, defaultdict(int)
            for key_id, n in requests.items():
                row = counts.get((key_id, minute))
                if row is None:
                    counts[(key_id, minute)] = [n, 0]
                else:
                    row[0] += n
        if self._rejected:
            rejected, self._rejected = self._rejected, defaultdict(int)
            for key_id, n in rejected.items():
                row = counts.get((key_id, minute))
                if row is None:
                    counts[(key_id, minute)] = [0, n]
                else:
                    row[1] += n

    def _restore_counts(self, rows: dict[tuple[str, int], list[int]]) -> None:
        """Put back the rows of a failed write, newer counts merged in, within the bound."""
        for key, (requests, rejected) in rows.items():
            row = self._counts.get(key)
            if row is None:
                self._counts[key] = [requests, rejected]
            else:
                row[0] += requests
                row[1] += rejected
        excess = len(self._counts) - self.max_usage_rows
        if excess > 0:
            for key in sorted(self._counts, key=lambda k: k[1])[:excess]:
                del self._counts[key]
            if not self.usage_dropped:
                logger.warning(
                    "keystile: the store is unreachable and %d usage rows are waiting;"
                    " dropping the oldest minutes",
                    self.max_usage_rows,
                )
            self.usage_dropped += excess

    def count_use(self, budget_id: str, n: int = 1) -> None:
        """Count ``n`` quota uses of ``budget_id`` (a key's, or its rotation chain's),
        taken from the store's remaining count by the next flush. No I/O."""
        self._uses[budget_id] = self._uses.get(budget_id, 0) + n

    def unwritten_uses(self, budget_id: str) -> int:
        """Uses of ``budget_id`` counted here and not yet known to be in the store (a
        flush under way, or one whose acknowledgement was lost, included): what a
        process must still subtract from the remaining count it read."""
        used = self._uses.get(budget_id, 0) + self._uses_in_flight.get(budget_id, 0)
        if self._unacknowledged is not None:
            used += self._unacknowledged[1].get(budget_id, 0)
        return used

    def on_quota(self, listener: QuotaListener) -> Callable[[], None]:
        """Call ``listener`` after every flush with the quota state of the keys written."""
        self._quota_listeners.append(listener)
        return lambda: self._quota_listeners.remove(listener)

    async def flush(self) -> int:
        """Write everything pending now; on failure the batch is kept and the error raised."""
        self._fold()
        counts, self._counts = self._counts, {}
        try:
            written = await self._flush_touches()
        except BaseException:
            self._restore_counts(counts)
            raise
        if counts:
            await self._flush_counts(counts)
        return written

    async def _flush_counts(self, counts: dict[tuple[str, int], list[int]]) -> None:
        add_usage = getattr(self.store, "add_usage", None)
        if add_usage is None:  # a store of its own that keeps no usage
            return
        rows = {
            (key_id, datetime.fromtimestamp(minute, timezone.utc)): (row[0], row[1])
            for (key_id, minute), row in counts.items()
        }
        try:
            with anyio.fail_after(self.flush_timeout):
                await add_usage(rows)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.flush_failures += 1
            self._restore_counts(counts)
            raise
        self.usage_rows_written += len(rows)

    async def _flush_touches(self) -> int:
        if not self._pending and not self._uses and self._unacknowledged is None:
            return 0
        batch, self._pending = self._pending, {}
        if self._unacknowledged is not None:
            # Uses whose write may have landed: sent again as they were, under their name,
            # so the store takes them once (newer uses wait for the next flush).
            name, uses = self._unacknowledged
            self._unacknowledged = None
        else:
            uses, self._uses = self._uses, {}
            name = uuid.uuid4().hex
        self._in_flight = batch
        self._uses_in_flight = uses
        touches = {k: datetime.fromtimestamp(at, timezone.utc) for k, at in batch.items()}
        try:
            with anyio.fail_after(self.flush_timeout):
                if uses:
                    quotas = await self.store.touch_many(touches, uses, batch=name)
                else:
                    quotas = await self.store.touch_many(touches)
        except BaseException as exc:
            self._in_flight = {}
            self._uses_in_flight = {}
            if isinstance(exc, Exception):
                self.flush_failures += 1
            for key_id, at in batch.items():
                if at > self._pending.get(key_id, -math.inf):
                    self._pending[key_id] = at
            if uses:
                self._unacknowledged = (name, uses)
            raise
        self._in_flight = {}
        self._uses_in_flight = {}
        self.flushes += 1
        self.touches_written += len(batch)
        if quotas:
            for listener in list(self._quota_listeners):
                try:
                    listener(quotas)
                except Exception:
                    logger.exception("keystile: a quota listener failed")
        return len(batch)

    async def run(self) -> None:
        """Flush periodically until cancelled (then the caller flushes once more)."""
        failing = False
        delay = self.flush_interval
        while True:
            self._wakeup = anyio.Event()
            if failing:
                await anyio.sleep(delay)
            elif self._pending_keys() < self.flush_max:
                with anyio.move_on_after(delay):
                    await self._wakeup.wait()
            try:
                await self.flush()
            except Exception as exc:
                if not failing:
                    logger.warning(
                        "keystile: writing last_used_at failed (%s); keeping %d keys and "
                        "retrying with backoff",
                        exc,
                        len(self._pending),
                    )
                failing = True
                delay = min(max(delay * 2, self.flush_interval), self.max_backoff)
                continue
            if failing:
                logger.warning("keystile: writing last_used_at works again")
            failing = False
            delay = self.flush_interval
