"""imagen-serve's batcher on its own (imagen.runtime.serve.batching and .engine, no web stack):
the grouping rule both servers use, dropping, grouping, refusing; each request's own noise; the
prompt fit; who imports the package."""

import asyncio
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from imagen.runtime.pipeline import batch_noise
from imagen.runtime.serve.batching import DROPPED, Batcher, Closing, QueueFull, next_batch, split_batches
from imagen.runtime.serve.engine import fitted_prompt

from bundles import fake_pipeline
from serving import WAIT, WEB

# --- the grouping rule ---------------------------------------------------------------------------

Item = namedtuple("Item", "key images")


def test_next_batch_takes_the_oldest_and_later_equal_keys_that_fit():
    items = [Item("a", 4), Item("b", 2), Item("a", 3), Item("a", 2), Item("b", 1), Item("a", 1)]
    assert next_batch(items, max_batch=8) == [0, 2, 5]  # a3 leaves no room for a2; a1 still fits
    assert next_batch(items[1:], max_batch=8) == [0, 3]  # b2 leads, b1 joins
    assert next_batch([Item("a", 9), Item("a", 1)], max_batch=8) == [0]  # the oldest always goes


def test_split_batches_is_next_batch_until_every_item_is_placed():
    items = [Item("a", 4), Item("b", 2), Item("a", 3), Item("a", 2), Item("b", 1), Item("a", 1)]
    batches = split_batches(items, max_batch=8)
    assert batches == [[0, 2, 5], [1, 4], [3]]
    assert sorted(index for batch in batches for index in batch) == list(range(len(items)))
    for batch in batches:
        assert len({items[index].key for index in batch}) == 1
        assert sum(items[index].images for index in batch) <= 8
    assert split_batches([Item("a", 8), Item("a", 1)], max_batch=8) == [[0], [1]]
    assert split_batches([], max_batch=8) == []


# --- the batcher alone -------------------------------------------------------------------------


class Engine:
    """run_batch for Batcher tests: records each batch's payloads; `open` holds every batch until set."""

    def __init__(self):
        self.batches, self.open, self.entered = [], threading.Event(), threading.Event()
        self.open.set()

    def __call__(self, payloads):
        self.entered.set()
        self.open.wait(WAIT)
        self.batches.append(list(payloads))
        return [f"done {payload}" for payload in payloads]


def run_async(coroutine_fn):
    return asyncio.run(asyncio.wait_for(coroutine_fn(), WAIT))


async def until_entered(engine):
    await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, WAIT)


def test_batcher_drops_a_request_whose_work_has_not_started():
    engine = Engine()

    async def scenario():
        batcher = Batcher(engine, max_batch=4, max_wait_s=0.0, max_queue_images=8)
        batcher.start()
        engine.open.clear()
        first = batcher.submit("k", 1, "first")
        await until_entered(engine)  # the first batch holds the engine
        gone, kept = batcher.submit("k", 2, "gone"), batcher.submit("k", 1, "kept")
        assert batcher.queued_images == 3
        assert batcher.drop(gone) and gone.state == DROPPED and gone.future.cancelled()
        assert batcher.queued_images == 1
        assert not batcher.drop(first)  # running: it finishes, unseen
        engine.open.set()
        assert await kept.future == "done kept"
        await batcher.close()
        return first

    first = run_async(scenario)
    assert engine.batches == [["first"], ["kept"]]  # "gone" never reached the engine
    assert first.future.result() == "done first"


def test_batcher_batches_equal_keys_oldest_first_up_to_max_batch():
    engine = Engine()

    async def scenario():
        batcher = Batcher(engine, max_batch=4, max_wait_s=60.0, max_queue_images=16)
        batcher.start()
        engine.open.clear()
        batcher.submit("x", 4, "x0")  # a full batch goes at once, without waiting out the window
        await until_entered(engine)
        jobs = [
            batcher.submit(key, n, name)
            for key, n, name in [("a", 2, "a1"), ("b", 1, "b1"), ("a", 1, "a2"), ("a", 2, "a3"), ("a", 1, "a4")]
        ]
        engine.open.set()
        await jobs[0].future  # a1's batch is full (4 images) and goes at once
        await batcher.close()  # b1 and a3 would wait out the window; closing runs them at once

    run_async(scenario)
    assert engine.batches == [["x0"], ["a1", "a2", "a4"], ["b1"], ["a3"]]


def test_batcher_refuses_when_full_or_closing():
    engine = Engine()

    async def scenario():
        batcher = Batcher(engine, max_batch=2, max_wait_s=60.0, max_queue_images=3)
        batcher.submit("k", 2, "a")  # not started: everything stays queued
        with pytest.raises(QueueFull) as full:
            batcher.submit("k", 2, "b")
        assert full.value.retry_after >= 1 and "holds 2 of at most 3 images" in str(full.value)
        batcher.start()
        await batcher.close()
        with pytest.raises(Closing):
            batcher.submit("k", 1, "c")

    run_async(scenario)
    assert engine.batches == [["a"]]  # close() ran what was queued


def test_batch_noise_is_each_requests_own_draws():
    seeds, rows = [11, 12, 13], [2, 1, 3]
    noise = batch_noise([np.random.Generator(np.random.PCG64(seed)) for seed in seeds], rows)
    shapes = [(6, 3, 4, 4), (6, 3, 8, 8), (6, 3, 8, 8)]
    draws = [noise(shape) for shape in shapes]
    for index, (seed, count) in enumerate(zip(seeds, rows)):
        solo = np.random.Generator(np.random.PCG64(seed))
        batch_rows = slice(sum(rows[:index]), sum(rows[: index + 1]))
        for shape, draw in zip(shapes, draws):
            np.testing.assert_array_equal(draw[batch_rows], solo.standard_normal((count, *shape[1:]), dtype=np.float32))
    with pytest.raises(RuntimeError, match="batch"):
        noise((5, 3, 4, 4))
    alone = batch_noise([np.random.Generator(np.random.PCG64(7))], [6])((6, 3, 4, 4))
    np.testing.assert_array_equal(
        alone, np.random.Generator(np.random.PCG64(7)).standard_normal((6, 3, 4, 4), np.float32)
    )


def test_fitted_prompt_is_the_longest_start_that_fits(fake_bundle):
    tokenizer = fake_pipeline(fake_bundle).tokenizer  # byte-level, 8 tokens: 7 bytes and eos
    assert fitted_prompt(tokenizer, "a red circle") == "a red c"
    assert fitted_prompt(tokenizer, "aé" * 5) == "aéaéa"  # é is 2 bytes: 7 bytes fit


def test_serve_is_imported_only_by_itself():
    """batching and engine import no web stack; no other runtime module imports the serve package."""
    code = (
        "import sys, imagen.runtime, imagen.runtime.serve.batching, imagen.runtime.serve.engine\n"
        f"print([m for m in {WEB + ('starlette', 'pydantic')!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    runtime = Path(__file__).parents[1] / "runtime"
    for path in runtime.rglob("*.py"):
        if "serve" not in path.relative_to(runtime).parts:
            text = path.read_text()
            assert "runtime.serve" not in text and "from .serve" not in text and "from . import serve" not in text, path
