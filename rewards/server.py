"""Serve a reward over HTTP: one worker thread owns the model, requests are batched from a bounded queue.

``imgalign serve-reward --reward SPEC --port N`` runs a :class:`RewardServer`; the client is
:class:`rewards.remote.RemoteReward` (``remote:http://host:N``), which also documents the
protocol. Why it is built this way:

* **One owner of the model.** HTTP requests are decoded and validated on the server's
  connection threads (a bad request is answered ``400`` at once), then queued; a single
  worker thread scores them, so the model never runs on two threads and the GPU sees one
  stream of batches.
* **Batched.** The worker takes the first waiting request and then every request already
  queued behind it, up to ``max_batch`` images, and scores requests of the same image size
  together: several trainers or filter processes sharing one server fill its batches.
* **Bounded.** The queue holds at most ``queue_size`` requests; one more is answered ``503``
  with ``Retry-After``, which the client retries with backoff. A request body is at most
  ``max_body_bytes``; a request that waits longer than ``request_timeout`` is answered ``504``.
* **Errors are JSON, one line.** ``{"error": "..."}`` with ``4xx`` for bad input and ``5xx`` for a
  failure of the reward; a traceback goes to the server's log, never to the client.

The server binds ``host`` (default loopback) and has no authentication: expose it beyond one
machine only on a network you trust.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import Tensor

from .base import Reward
from .remote import PROTOCOL_VERSION, decode_request, info_to_json

__all__ = ["RewardServer"]


@dataclass
class _Job:
    """One ``POST /score`` request, waiting for the worker."""

    images: Tensor
    prompts: list[str] | None
    cond: dict[str, Tensor]
    details: bool
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    detail_rows: list[dict] | None = None
    batch: int = 0
    status: int = 200
    error: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def shape_key(self) -> tuple:
        return (tuple(self.images.shape[1:]), *((k, tuple(v.shape[1:])) for k, v in sorted(self.cond.items())))

    def fail(self, status: int, message: str) -> None:
        self.status, self.error = status, message
        self.done.set()


class _ShuttingDown(Exception):
    """A request that arrived while the server stops."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds before accept: concurrent clients are not refused


class RewardServer:
    """``reward`` served at ``http://host:port`` (``port=0``: any free port; read :attr:`port`).

    ``start()`` serves from background threads (tests, notebooks); ``serve_forever()`` blocks
    (the command line); ``stop()`` closes the socket and answers every waiting request ``503``.
    ``log`` receives one line per failed request (default: stderr).
    """

    def __init__(self, reward: Reward, *, host: str = "127.0.0.1", port: int = 0, max_batch: int = 32,
                 queue_size: int = 64, request_timeout: float = 600.0, max_body_bytes: int = 1 << 30,
                 log: Callable[[str], None] | None = None) -> None:  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        self.reward = reward.eval()
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.request_timeout = float(request_timeout)
        self.max_body_bytes = int(max_body_bytes)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        # details() is optional in the contract: only a reward that overrides it has any
        self.has_details = type(reward).details is not Reward.details
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._carry: _Job | None = None  # taken from the queue but past max_batch: first of the next batch
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counters = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0, "rejected": 0, "errors": 0}
        self._busy = False
        self._started = time.time()
        self._httpd = _HTTPServer((host, port), _handler_class(self))
        self._worker = threading.Thread(target=self._work, name="reward-worker", daemon=True)
        self._loop: threading.Thread | None = None  # the thread running the HTTP loop

    # -- where -------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> RewardServer:
        """Serve from background threads and return at once."""
        self._worker.start()
        self._loop = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                      name="reward-http", daemon=True)  # fmt: skip
        self._loop.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`stop` (from another thread) or Ctrl-C."""
        self._worker.start()
        self._loop = threading.current_thread()
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._loop = None
            self.stop()

    def stop(self) -> None:
        """Stop accepting, close the socket, answer every waiting request 503, stop the worker."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        loop = self._loop
        if loop is not None and loop is not threading.current_thread():
            self._httpd.shutdown()  # returns once the loop has stopped
        self._httpd.server_close()
        while True:
            try:
                self._queue.get_nowait().fail(503, "the reward server is shutting down; retry against a running one")
            except queue.Empty:
                break
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout=5)  # a batch still scoring finishes on its own (daemon thread)

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what it says about itself ----------------------------------------------------------
    def info(self) -> dict:
        return {**info_to_json(self.reward.info), "has_details": self.has_details, "max_batch": self.max_batch,
                "protocol": PROTOCOL_VERSION}  # fmt: skip

    def health(self) -> dict:
        with self._lock:
            counters = dict(self._counters)
            busy = self._busy
        return {"status": "stopping" if self._stopping.is_set() else "ok", "reward": self.reward.info.name,
                "info": info_to_json(self.reward.info), "device": str(self.reward.device),
                "queue_depth": self._queue.qsize(), "queue_size": self.queue_size, "max_batch": self.max_batch,
                "busy": busy, "uptime_s": round(time.time() - self._started, 3), **counters}  # fmt: skip

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._counters[key] += value

    # -- requests (connection threads) ------------------------------------------------------
    def submit(self, body: bytes, content_type: str) -> _Job:
        """Decode, validate and queue one request; the job is answered when ``job.done`` is set.

        Raises :class:`ProtocolError`/``ValueError`` for bad input and ``queue.Full`` when the queue is full.
        """
        if self._stopping.is_set():
            raise _ShuttingDown
        images, prompts, cond, details = decode_request(body, content_type)
        images, prompts, cond = self.reward.validate(images, prompts, **cond)
        # validate() gives a view [1,...] expanded to B for a single conditioning image; copy it for cat()
        job = _Job(images, prompts, {k: v.contiguous() for k, v in cond.items()}, details and self.has_details)
        self._queue.put_nowait(job)
        self._count(requests=1)
        return job

    # -- the worker ---------------------------------------------------------------------------
    def _next_batch(self) -> list[_Job]:
        """The first waiting job (waiting for one at most 0.1 s), then every queued job that fits in max_batch."""
        first = self._carry
        self._carry = None
        if first is None:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return []
        jobs, size = [first], len(first)
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if size + len(job) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            size += len(job)
        return jobs

    def _work(self) -> None:
        while not self._stopping.is_set() or self._carry is not None:
            jobs = self._next_batch()
            if not jobs:
                continue
            if self._stopping.is_set():
                for job in jobs:
                    job.fail(503, "the reward server is shutting down; retry against a running one")
                continue
            with self._lock:
                self._busy = True
            try:
                groups: dict[tuple, list[_Job]] = {}
                for job in jobs:
                    groups.setdefault(job.shape_key(), []).append(job)
                for group in groups.values():
                    self._run_group(group)
            finally:
                with self._lock:
                    self._busy = False

    def _run_group(self, group: list[_Job]) -> None:
        try:
            self._score(group)
        except Exception:  # noqa: BLE001 - one request's failure must not fail the others: score them alone
            if len(group) == 1:
                self._fail(group[0])
                return
            for job in group:
                try:
                    self._score([job])
                except Exception:  # noqa: BLE001 - answered as JSON, logged here
                    self._fail(job)

    def _fail(self, job: _Job) -> None:
        err = sys.exc_info()[1]
        message = " ".join(f"{type(err).__name__}: {err}".split())
        status = 400 if isinstance(err, ValueError) else 500
        self._count(errors=1)
        self.log(f"serve-reward: request of {len(job)} image(s) failed ({status}): {message}")
        job.fail(status, message)

    @torch.no_grad()
    def _score(self, group: list[_Job]) -> None:
        images = torch.cat([job.images for job in group])
        prompts = [p for job in group for p in job.prompts] if group[0].prompts is not None else None
        cond = {key: torch.cat([job.cond[key] for job in group]) for key in group[0].cond}
        scores = self.reward.score_batched(images, prompts, batch_size=self.max_batch, **cond).float().cpu()
        rows = None
        if any(job.details for job in group):
            device = self.reward.device
            rows = self.reward.details(images.to(device), prompts, **{k: v.to(device) for k, v in cond.items()})
        with self._lock:
            self._counters["batches"] += 1
            self._counters["images"] += len(images)
            self._counters["largest_batch"] = max(self._counters["largest_batch"], len(images))
        start = 0
        for job in group:
            stop = start + len(job)
            job.scores = [float(v) for v in scores[start:stop]]
            if job.details and rows is not None:
                job.detail_rows = [{k: float(v) for k, v in row.items()} for row in rows[start:stop]]
            job.batch = len(images)
            job.done.set()
            start = stop


def _handler_class(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "imgalign-reward-server"

        def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
            """No access log: failures are logged once, where they are answered."""

        def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: nothing to answer
                pass

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": " ".join(message.split())}, headers)

        def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
            path = self.path.split("?")[0].rstrip("/")
            try:
                if path.endswith("/health"):
                    self._send(200, server.health())
                elif path.endswith("/info"):
                    self._send(200, server.info())
                else:
                    self._error(404, f"no such endpoint {self.path!r}: GET /health, GET /info, POST /score")
            except Exception as err:  # noqa: BLE001 - never a traceback to the client
                server.log(f"serve-reward: GET {path} failed: {type(err).__name__}: {err}")
                self._error(500, f"{type(err).__name__}: {err}")

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if not path.endswith("/score"):
                self._error(404, f"no such endpoint {self.path!r}: POST /score")
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._error(411, "send the body with a Content-Length header")
                return
            if int(length) > server.max_body_bytes:
                self._error(413, f"request body of {int(length)} bytes exceeds the server's {server.max_body_bytes}: "
                                 "send fewer images per request, or PNG")  # fmt: skip
                self.close_connection = True
                return
            try:
                body = self.rfile.read(int(length))
                job = server.submit(body, self.headers.get("Content-Type", ""))
            except queue.Full:
                server._count(rejected=1)
                self._error(503, f"the queue is full ({server.queue_size} requests waiting): retry later",
                            {"Retry-After": "1"})  # fmt: skip
                return
            except _ShuttingDown:
                self._error(503, "the reward server is shutting down; retry against a running one", {"Retry-After": "1"})
                return
            except ValueError as err:  # ProtocolError included: bad input
                self._error(400, str(err))
                return
            except Exception as err:  # noqa: BLE001
                server.log(f"serve-reward: POST /score failed: {type(err).__name__}: {err}")
                self._error(500, f"{type(err).__name__}: {err}")
                return
            if not job.done.wait(server.request_timeout):
                job.fail(504, f"not scored within the server's request timeout ({server.request_timeout:g}s)")
            if job.error is not None:
                self._error(job.status, job.error, {"Retry-After": "1"} if job.status == 503 else None)
                return
            self._send(200, {"scores": job.scores, "details": job.detail_rows, "batch": job.batch})

    return Handler

