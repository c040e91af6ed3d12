"""The request queue and the batcher: concurrent requests with the same key run as one engine batch.

`next_batch` is the rule of which requests share an engine batch, for imagen-serve's queue and the
Ray app's gathered requests alike: the oldest request, and after it, in arrival order, every
request with its key (its settings without the seed) whose images still fit in `max_batch`. Seeds
and negative prompts are not in the key: `Pipeline.generate` takes one of each per request.

A `Batcher` lives on one asyncio event loop. `submit` queues a job (refused when the queue, bounded
in images, is full, or when the batcher is closing); one loop task takes the oldest job's
`next_batch` once it holds `max_batch` images (or the queue is full, so that nothing more can join)
or the oldest job has waited `max_wait_s`, and hands the batch to `run_batch` in a worker thread.
One batch runs at a time, so the event loop never waits on NumPy and the engines never see two
batches at once.

`drop` takes back a job whose work has not started (its client went away or its time ran out): it
leaves the queue and never reaches the engines. A job that is already running finishes; its result
is simply not delivered. This module imports no web framework.
"""

import asyncio
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, DONE, DROPPED = "queued", "running", "done", "dropped"


def next_batch(items: Sequence, max_batch: int) -> list[int]:
    """Indices of the engine batch led by `items[0]` (the oldest): it, and each later item with its
    `key` whose `images` still fit, at most `max_batch` images in all. The oldest always goes, so
    none starves."""
    head = items[0]
    batch, images = [0], head.images
    for index, item in enumerate(items[1:], start=1):
        if item.key == head.key and images + item.images <= max_batch:
            batch.append(index)
            images += item.images
    return batch


def split_batches(items: Sequence, max_batch: int) -> list[list[int]]:
    """Indices of all `items` in engine batches, `next_batch` after `next_batch`, oldest first."""
    left, batches = list(range(len(items))), []
    while left:
        chosen = [left[index] for index in next_batch([items[index] for index in left], max_batch)]
        batches.append(chosen)
        left = [index for index in left if index not in chosen]
    return batches


class QueueFull(Exception):
    """The queue has no room for a job's images; `retry_after` is a guess in whole seconds."""

    def __init__(self, images: int, queued: int, limit: int, retry_after: int):
        self.images, self.queued, self.limit, self.retry_after = images, queued, limit, retry_after
        super().__init__(
            f"the queue holds {queued} of at most {limit} images and cannot take {images} more; "
            f"retry in {retry_after} s or ask for fewer images"
        )


class Closing(Exception):
    """The batcher is draining (the server is shutting down) and takes no new jobs."""


@dataclass(eq=False)
class Job:
    """One request in the queue: `images` rows of the batch under `key`; `payload` is what
    `run_batch` gets; `future` receives `run_batch`'s result for this job."""

    key: Hashable
    images: int
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    state: str = QUEUED


class Batcher:
    """`run_batch(payloads) -> results` (one per payload, in order) runs in one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list], list],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue_images: int,
        on_batch: Callable[[list[Job], float], None] | None = None,
    ):
        if max_batch < 1 or max_queue_images < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue_images must be >= 1 and max_wait_s >= 0")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait_s, self.max_queue_images = max_batch, max_wait_s, max_queue_images
        self.batch_seconds = 1.0  # a running mean of batch time, for Retry-After
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.closing = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagen-engine")
        self._task: asyncio.Task | None = None

    @property
    def queued_images(self) -> int:
        return sum(job.images for job in self.queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="imagen-batcher")

    def submit(self, key: Hashable, images: int, payload) -> Job:
        """Queues a job of `images` images; raises QueueFull or Closing."""
        if self.closing:
            raise Closing("the server is shutting down and takes no new requests")
        queued = self.queued_images
        if queued + images > self.max_queue_images:
            raise QueueFull(images, queued, self.max_queue_images, self.retry_after())
        job = Job(key, images, payload, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self._wake.set()
        return job

    def drop(self, job: Job) -> bool:
        """Takes `job` back if its work has not started (True); a running job finishes unseen."""
        if job.state != QUEUED:
            return False
        self.queue.remove(job)
        job.state = DROPPED
        job.future.cancel()
        self._wake.set()
        return True

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on by one batch more than it holds now."""
        batches = math.ceil(self.queued_images / self.max_batch) + 1
        return max(1, math.ceil(batches * self.batch_seconds))

    async def close(self, timeout: float | None = None) -> None:
        """Takes no new jobs, runs the queued ones (without waiting out the window), then stops the
        loop; after `timeout` seconds the jobs still queued fail with Closing."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                for job in list(self.queue):
                    self.queue.remove(job)
                    job.state = DROPPED
                    if not job.future.done():
                        job.future.set_exception(Closing("the server shut down before this request ran"))
                self._wake.set()
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _next_batch(self) -> tuple[list[Job], bool]:
        """The oldest job and the queued jobs with its key that fit, and whether the batch may go now."""
        head = self.queue[0]
        batch = [self.queue[index] for index in next_batch(self.queue, self.max_batch)]
        images = sum(job.images for job in batch)
        # no job can join a full batch, nor any batch while the queue is full
        full = images >= self.max_batch or self.queued_images >= self.max_queue_images
        ready = full or self.closing or time.monotonic() >= head.enqueued + self.max_wait_s
        return batch, ready

    async def _gather(self) -> list[Job] | None:
        """Waits for a batch to be ready; None when the batcher is closing and the queue is empty."""
        while True:
            self._wake.clear()  # cleared before looking, so no submit between the look and the wait is missed
            if not self.queue:
                if self.closing:
                    return None
                await self._wake.wait()
                continue
            batch, ready = self._next_batch()
            if ready:
                return batch
            wait = self.queue[0].enqueued + self.max_wait_s - time.monotonic()
            try:
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))
            except asyncio.TimeoutError:
                pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._gather()) is not None:
            start = time.monotonic()
            for job in batch:
                self.queue.remove(job)
                job.state, job.started = RUNNING, start
            self.running, results, failure = batch, None, None
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [job.payload for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error; the loop goes on
                failure = error
            seconds = time.monotonic() - start
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
            self.running = []
            for index, job in enumerate(batch):
                job.state = DONE
                if job.future.done():  # its request already went (time limit, disconnect)
                    continue
                if failure is not None:
                    job.future.set_exception(failure)
                else:
                    job.future.set_result(results[index])
            if self.on_batch is not None:
                self.on_batch(batch, seconds)
