"""Prometheus metrics of one server: requests and latency by method and status code, the
index size, the model version, reloads, the worker lanes. Each server has its own registry
(tests run many)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# From a sub-millisecond similar-songs lookup to a multi-second model reload.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
# Pieces of model work aim at 20 ms (server.workers.PIECE_SECONDS): finer around that.
PIECE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0, 10.0)


class Metrics:
    """The server's collectors, registered in a private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("songrec_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("songrec_request_seconds",
                                 "RPC latency in seconds, by method and status code",
                                 ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("songrec_in_flight_requests", "RPCs being handled", registry=r)
        self.indexed_songs = Gauge("songrec_indexed_songs",
                                   "songs in the served index (bundle + added)", registry=r)
        self.added_songs = Gauge("songrec_added_songs", "songs added at run time", registry=r)
        self.model = Gauge("songrec_model_info", "1 for the model version being served",
                           ["model_version"], registry=r)
        self.reloads = Counter("songrec_reloads", "ReloadModel attempts by result",
                               ["result"], registry=r)
        self.wal_torn = Counter("songrec_wal_torn_records",
                                "torn last records dropped from the write-ahead log",
                                registry=r)
        self.store_up = Gauge("songrec_store_up",
                              "1 while the song store answers, 0 while it cannot be reached",
                              registry=r)
        self.store_applied_seq = Gauge("songrec_store_applied_seq",
                                       "the song store's last sequence number this server "
                                       "has applied", registry=r)
        self.store_unplaceable = Gauge("songrec_store_unplaceable_songs",
                                       "stored songs whose metadata the served model cannot "
                                       "encode (not served by it)", registry=r)
        self.store_errors = Counter("songrec_store_errors",
                                    "failed song store operations, by operation and status",
                                    ["operation", "code"], registry=r)
        self.similar_batch = Histogram("songrec_similar_batch_size",
                                       "SimilarSongs lookups answered per index query",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        # The worker lanes (server.workers): how long work waits for a thread is what
        # saturation looks like; health stays SERVING (docs/OPERATIONS.md, Observe).
        self.work_wait = Histogram("songrec_work_wait_seconds",
                                   "time a piece of model work waited for a worker, by lane",
                                   ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.work_queued = Gauge("songrec_work_queued", "pieces of model work waiting for a "
                                 "worker, by lane", ["lane"], registry=r)
        self.piece_seconds = Histogram("songrec_work_piece_seconds",
                                     "time a piece of model work held a worker, by lane",
                                     ["lane"], buckets=PIECE_BUCKETS, registry=r)
        self.heavy_calls = Gauge("songrec_heavy_calls",
                                 "calls in progress that are heavy by the cost model",
                                 registry=r)
        self.stopped_calls = Counter("songrec_stopped_calls",
                                     "calls stopped between pieces of their work, by why "
                                     "(deadline, cancelled)", ["reason"], registry=r)
        for lane in ("light", "heavy"):  # exported at 0 before the first call
            self.work_wait.labels(lane)
            self.work_queued.labels(lane)
            self.piece_seconds.labels(lane)
        self._http: Any = None
        # (method, code) -> (counter child, histogram child): labels() validates and locks
        # on every call, which the hot path need not repeat for a pair it has seen.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC."""
        children = self._children.get((method, code))
        if children is None:
            children = (self.requests.labels(method, code), self.latency.labels(method, code))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def set_model(self, version: str | None, indexed: int, added: int) -> None:
        """Publish what is being served (``version`` None: nothing)."""
        self.model.clear()
        if version is not None:
            self.model.labels(version).set(1)
        self.indexed_songs.set(indexed)
        self.added_songs.set(added)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
