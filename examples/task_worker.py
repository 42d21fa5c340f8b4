"""A task-queue worker that checks the key each job was submitted with.

A job queued on behalf of a customer carries their API key (or the API handler passes
the key it received); the worker verifies it before doing the work, with
``keystile.verify``: the key is refused if it was revoked, disabled or expired since the
job was queued, the job spends the key's rate limit and quota, and it shows in the key's
``last_used_at`` and usage. The worker keeps one verified-key cache for its life, so
argon2 runs once per key, not once per job.

The queue here is an ``asyncio.Queue``; with Celery, RQ or arq, ``handle`` is the task
body. Run it beside a database with keys in it::

    python examples/task_worker.py ks_... ks_...
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import keystile
from keystile import AuthenticationError
from keystile.verification import aclose

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")


class Job:
    """A queued job: the key it was submitted with (never in its repr) and its payload."""

    __slots__ = ("key", "payload")

    def __init__(self, key: str, payload: dict[str, Any]) -> None:
        self.key = key
        self.payload = payload

    def __repr__(self) -> str:
        return f"Job(payload={self.payload!r})"


async def handle(job: Job, database_url: str = DATABASE_URL, **options: Any) -> dict[str, Any]:
    """Run ``job`` for the owner of its key, or say why the key was refused."""
    try:
        user = await keystile.verify(job.key, database_url=database_url, **options)
    except AuthenticationError as exc:
        return {"done": False, "refused": exc.reason}
    if not user.has_scopes("reports:write"):
        return {"done": False, "refused": "insufficient_scope"}
    return {"done": True, "owner": user.owner, "by": user.display_name, **job.payload}


async def work(queue: asyncio.Queue[Job | None], database_url: str = DATABASE_URL) -> None:
    """Take jobs until ``None``; at the end write the keys' usage and close the store."""
    try:
        while (job := await queue.get()) is not None:
            print(await handle(job, database_url))
    finally:
        await aclose()


async def main(keys: list[str]) -> None:
    queue: asyncio.Queue[Job | None] = asyncio.Queue()
    for number, key in enumerate(keys):
        queue.put_nowait(Job(key, {"report": number}))
    queue.put_nowait(None)
    await work(queue)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
