"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self, batcher, max_batch: int):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "imagen_requests", "Generation requests answered, by HTTP status", ["status"], registry=registry
        )
        self.images = Counter("imagen_images", "Images returned to clients", registry=registry)
        self.dropped = Counter(
            "imagen_requests_dropped",
            "Requests taken out of the queue before their work started (client gone or time limit)",
            registry=registry,
        )
        self.latency = Histogram(
            "imagen_request_seconds",
            "Latency of successful generation requests, arrival to answer",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "imagen_queue_wait_seconds",
            "Time a request waited in the queue before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "imagen_batch_seconds", "Wall time of one engine batch", buckets=LATENCY_BUCKETS, registry=registry
        )
        sizes = tuple(range(1, max_batch + 1))
        self.batch_images = Histogram(
            "imagen_batch_images", "Images per engine batch", buckets=sizes, registry=registry
        )
        self.batch_requests = Histogram(
            "imagen_batch_requests", "Requests per engine batch", buckets=sizes, registry=registry
        )
        Gauge("imagen_queue_images", "Images waiting in the queue", registry=registry).set_function(
            lambda: batcher.queued_images
        )
        Gauge("imagen_queue_requests", "Requests waiting in the queue", registry=registry).set_function(
            lambda: len(batcher.queue)
        )
        Gauge("imagen_running_requests", "Requests in the engine batch now running", registry=registry).set_function(
            lambda: len(batcher.running)
        )
        self.in_flight = Gauge(
            "imagen_requests_in_flight", "Generation requests accepted and not yet answered", registry=registry
        )
        self.ready = Gauge(
            "imagen_ready", "1 when the server takes requests (loaded, warmed, not draining)", registry=registry
        )

    def observe_batch(self, jobs, seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        self.batch_images.observe(sum(job.images for job in jobs))
        self.batch_requests.observe(len(jobs))
        for job in jobs:
            self.queue_wait.observe(job.started - job.enqueued)
