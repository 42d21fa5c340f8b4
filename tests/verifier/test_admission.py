"""Admission of misses: the failure budget per key id, the suspects' share, and what a
refused owner and a refused guesser each see."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest

from keystile import CHEAPEST_PARAMETERS, CreatedKey, KeyManager, KeyRecord, MemoryKeyStore
from keystile.admission import SUSPECTS_AT_ONCE, Admission, FailureBudget
from keystile.errors import InvalidToken, ServiceUnavailable
from keystile.hashing import SecretHasher
from keystile.tokens import generate_key
from keystile.verifier import Verifier

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryKeyStore):
    """A memory store that counts reads, and can hold the reads of chosen ids until the
    test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.held: dict[str, anyio.Event] = {}
        self.reading = 0
        self.most_reading = 0
        self.entered = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        release = self.held.get(key_id)
        if release is not None:
            self.entered += 1
            self.reading += 1
            self.most_reading = max(self.most_reading, self.reading)
            try:
                await release.wait()
            finally:
                self.reading -= 1
        return await super().get(key_id)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        return await super().get_many(key_ids)

    def hold(self, *key_ids: str) -> anyio.Event:
        """Hold the reads of ``key_ids`` until the returned event is set."""
        release = anyio.Event()
        self.held.update(dict.fromkeys(key_ids, release))
        return release


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
async def key(store: CountingStore) -> CreatedKey:
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="ci")
    store.gets = 0
    return created


def verifier(store: CountingStore, clock: Clock, **options: object) -> Verifier:
    return Verifier(
        store,
        hasher=SecretHasher(CHEAPEST_PARAMETERS),
        monotonic=clock,
        **options,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def another_miss_waiting(v: Verifier, store: CountingStore) -> AsyncIterator[None]:
    """Another tenant's first request, its store read held: the misses under test are not
    alone, as in a flood."""
    busy = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="busy", name="api")
    release = store.hold(busy.id)
    entered = store.entered
    async with anyio.create_task_group() as tg:
        tg.start_soon(v.verify, busy.key.encode())
        with anyio.fail_after(5):
            while store.entered == entered:
                await anyio.sleep(0.01)
        yield
        release.set()


async def refusal(v: Verifier, token: str) -> str:
    try:
        await v.verify(token.encode())
    except (InvalidToken, ServiceUnavailable) as exc:
        return f"{exc.status_code} {exc.reason}"
    return "200"


# -- the bucket ------------------------------------------------------------------------


def test_budget_fills_with_failures_and_drains_with_time() -> None:
    """Each failure adds one; at the budget the id is exhausted until one has drained."""
    clock = Clock()
    budget = FailureBudget(budget=3, refill=2.0, timer=clock)
    for _ in range(2):
        budget.failed("a")
    assert not budget.exhausted("a")
    budget.failed("a")
    assert budget.exhausted("a") and not budget.exhausted("b")
    clock.now = 1.9
    assert budget.exhausted("a")
    clock.now = 2.0
    assert not budget.exhausted("a")
    assert budget.level("a") == pytest.approx(2.0)
    clock.now = 6.0
    assert budget.level("a") == 0.0


def test_a_proven_secret_empties_the_bucket() -> None:
    """A success forgets the id's failures at once."""
    budget = FailureBudget(budget=2, refill=10.0, timer=Clock())
    budget.failed("a")
    budget.failed("a")
    budget.succeeded("a")
    assert budget.level("a") == 0.0


def test_budget_remembers_a_bounded_number_of_ids() -> None:
    """Past its size, the least recently failed id is forgotten."""
    budget = FailureBudget(budget=1, refill=60.0, timer=Clock(), maxsize=2)
    for key_id in ("a", "b", "c"):
        budget.failed(key_id)
    assert [budget.exhausted(k) for k in ("a", "b", "c")] == [False, True, True]


# -- refused before the store read ------------------------------------------------------


async def test_exhausted_id_is_refused_before_the_store_read(
    store: CountingStore, key: CreatedKey
) -> None:
    """Past the budget, while others wait, wrong secrets are refused 503 without a store
    read or argon2."""
    v = verifier(store, Clock(), failure_budget=3)
    async with another_miss_waiting(v, store):
        for _ in range(3):
            assert await refusal(v, generate_key(key_id=key.id)[0]) == "401 wrong_secret"
        reads = store.gets
        assert await refusal(v, generate_key(key_id=key.id)[0]) == "503 too_many_failures"
        assert store.gets == reads
        assert v.counters.argon2_verifications == 3


async def test_with_nobody_else_waiting_an_exhausted_id_is_still_verified(
    store: CountingStore, key: CreatedKey
) -> None:
    """A lone client guessing one secret after another takes nothing from anyone: it gets
    401 for each, never a 5xx, and the owner's key still verifies."""
    v = verifier(store, Clock(), failure_budget=2)
    answers = {await refusal(v, generate_key(key_id=key.id)[0]) for _ in range(6)}
    assert answers == {"401 wrong_secret"}
    assert v.admission.budget.exhausted(key.id)
    assert (await v.verify(key.key.encode())).key_id == key.id


async def test_unknown_id_spends_its_budget_as_a_real_one_does(store: CountingStore) -> None:
    """An id with no key is refused the same way after as many failures."""
    v = verifier(store, Clock(), failure_budget=3)
    unknown = generate_key()[1].key_id
    async with another_miss_waiting(v, store):
        answers = [await refusal(v, generate_key(key_id=unknown)[0]) for _ in range(4)]
    assert answers == ["401 unknown"] * 3 + ["503 too_many_failures"]


async def test_waiters_behind_a_failed_verification_see_its_failure(
    store: CountingStore, key: CreatedKey
) -> None:
    """With a budget of one, the misses queued behind a failing one never read the store."""
    v = verifier(store, Clock(), failure_budget=1)
    answers: list[str] = []

    async def guess() -> None:
        answers.append(await refusal(v, generate_key(key_id=key.id)[0]))

    async with another_miss_waiting(v, store):
        release = store.hold(key.id)
        reads = store.gets
        async with anyio.create_task_group() as tg:
            for _ in range(1 + v.per_key_pending):
                tg.start_soon(guess)
            with anyio.fail_after(5):
                while v.pending_verifications < 2 + v.per_key_pending:
                    await anyio.sleep(0.01)
            release.set()
        assert store.gets == reads + 1
    assert sorted(answers) == ["401 wrong_secret"] + ["503 too_many_failures"] * 3


# -- the owner of a flooded id ----------------------------------------------------------


async def test_cached_key_of_a_flooded_id_keeps_working(
    store: CountingStore, key: CreatedKey
) -> None:
    """A key already proven is answered from the cache whatever its id's budget says."""
    v = verifier(store, Clock(), failure_budget=2)
    await v.verify(key.key.encode())
    for _ in range(5):
        await refusal(v, generate_key(key_id=key.id)[0])
    assert v.admission.budget.exhausted(key.id)
    assert (await v.verify(key.key.encode())).key_id == key.id


async def test_owner_is_served_again_once_the_bucket_has_drained(
    store: CountingStore, key: CreatedKey
) -> None:
    """An uncached owner refused during a flood gets a retryable 503, nothing of it is
    remembered, and the same key is verified once one failure has drained."""
    clock = Clock()
    v = verifier(store, clock, failure_budget=2, failure_refill=1.0)
    async with another_miss_waiting(v, store):
        for _ in range(2):
            await refusal(v, generate_key(key_id=key.id)[0])
        with pytest.raises(ServiceUnavailable) as refused:
            await v.verify(key.key.encode())
        assert (refused.value.reason, refused.value.retry_after) == ("too_many_failures", 1)
        clock.now = 1.0
        assert (await v.verify(key.key.encode())).key_id == key.id
    assert v.admission.budget.level(key.id) == 0.0


# -- the suspects' share ----------------------------------------------------------------


async def test_suspects_hold_a_quarter_of_the_slots_and_clean_misses_the_rest() -> None:
    """Misses of ids with failures are refused past their share; a clean id still gets in."""
    admission = Admission(
        max_pending=16, per_key_pending=1, budget=FailureBudget(budget=10, timer=Clock())
    )
    assert admission.suspect_max == 4
    for i in range(6):
        admission.budget.failed(f"s{i}")
    answers: list[str] = []
    release = anyio.Event()

    async def miss(key_id: str) -> None:
        try:
            async with admission.admitted(key_id):
                answers.append(f"{key_id} in")
                await release.wait()
        except ServiceUnavailable as exc:
            answers.append(f"{key_id} {exc.reason}")

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(miss, f"s{i}")
        tg.start_soon(miss, "clean")
        with anyio.fail_after(5):
            while len(answers) < 5:  # 2 suspects at a turn (2 wait), 2 refused, the clean one
                await anyio.sleep(0.01)
        assert admission.pending == 5 and admission.suspect_pending == 4
        release.set()
    assert sorted(answers).count("clean in") == 1
    assert sum(a.endswith("overloaded") for a in answers) == 2
    assert admission.pending == admission.suspect_pending == 0


async def test_suspects_read_the_store_a_few_at_a_time(store: CountingStore) -> None:
    """However many suspect misses wait, at most SUSPECTS_AT_ONCE read the store at once,
    and a clean id's miss is verified meanwhile."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    flooded = [await manager.create(owner="m", name=f"k{i}") for i in range(8)]
    tenant = await manager.create(owner="t", name="api")
    v = verifier(store, Clock())
    for k in flooded:
        v.admission.budget.failed(k.id)
    release = store.hold(*(k.id for k in flooded))
    answers: list[str] = []

    async def guess(k: CreatedKey) -> None:
        answers.append(await refusal(v, generate_key(key_id=k.id)[0]))

    async with anyio.create_task_group() as tg:
        for k in flooded:
            tg.start_soon(guess, k)
        with anyio.fail_after(5):
            while store.entered < SUSPECTS_AT_ONCE:
                await anyio.sleep(0.01)
        assert (await v.verify(tenant.key.encode())).key_id == tenant.id
        assert store.reading == SUSPECTS_AT_ONCE
        release.set()
    assert store.most_reading == SUSPECTS_AT_ONCE
    assert answers == ["401 wrong_secret"] * len(flooded)
