"""Four threads at once, for the tests that share one backend between threads."""

import threading


def failures_in_threads(work, count: int = 4) -> list:
    """Runs `work(index)` in `count` threads that start together (a barrier, so that all are alive at
    once); returns (index, what went wrong) for each thread whose work returned something or raised."""
    barrier, failures = threading.Barrier(count), []

    def run(index):
        try:
            barrier.wait()
            failure = work(index)
            if failure is not None:
                failures.append((index, failure))
        except Exception as error:  # noqa: BLE001 - reported with the thread's index
            failures.append((index, error))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures
