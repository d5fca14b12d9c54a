"""A reward served by another process: the client ``remote:http://host:port`` and the wire format.

Large rewards (a 7B VLM judge, EditReward) often live on their own GPU or machine, next to a
generator being trained elsewhere. ``imgalign serve-reward --reward SPEC --port N`` serves any
reward (:mod:`rewards.server`); ``rewards.load("remote:http://host:N")`` returns a
:class:`RemoteReward` that keeps the reward contract (``images [B,3,H,W]`` in ``[0,1]`` in,
``Tensor[B]`` out, prompts and conditioning images as the served reward declares), so every
command and trainer that only *calls* a reward can use it. It is not differentiable: trainers
that backpropagate through the reward refuse it.

The protocol (version 1), three endpoints:

* ``GET /health``: the reward's name, device, queue depth and counters (requests, batches,
  largest batch, rejected requests);
* ``GET /info``: the served reward's :class:`~rewards.base.RewardInfo` as JSON (plus
  ``has_details``, ``max_batch``, ``protocol``);
* ``POST /score``: either a safetensors file (``Content-Type: application/octet-stream``; the
  tensors ``images`` and any of ``source_images``/``reference_images``, float ``[B,3,H,W]``;
  the header's ``__metadata__`` holds ``prompts`` as a JSON list and ``details`` as ``"1"``),
  exact; or JSON (``application/json``) ``{"images": [base64 PNG, ...], "prompts": [...],
  "source_images": [...], "details": false}``, 8-bit. The answer is JSON ``{"scores": [...],
  "details": [...] | null, "batch": N}`` (``batch``: how many images were scored together).
  Errors answer JSON ``{"error": "..."}``: 4xx for bad input, 503 when the queue is full,
  5xx when the reward failed.

Scores cross as JSON numbers: a float32 score round-trips exactly through a JSON double, so
with tensors on the wire a remote score equals the in-process score bit for bit.

The client retries what a restart or a busy server causes (connection refused or reset, a
timeout, ``503``) with exponential backoff, a maximum number of attempts and a maximum total
wait; then it raises one line naming the URL and what to do. Bad input (``4xx``) is a
``ValueError`` and a failure of the served reward (``5xx``) a :class:`RewardServerError`; neither
is retried, since the same request would fail the same way. Defaults come from keyword options
(``rewards.load("remote:http://...", retries=3)``, or a ``reward.json``), then the environment
(``IMGALIGN_REMOTE_RETRIES``, ``IMGALIGN_REMOTE_TIMEOUT``, ``IMGALIGN_REMOTE_CONNECT_TIMEOUT``,
``IMGALIGN_REMOTE_BACKOFF``, ``IMGALIGN_REMOTE_MAX_WAIT``), then :data:`DEFAULTS`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

from .base import CONDITION_INPUTS, Reward, RewardInfo
from .registry import REMOTE_PREFIX as PREFIX

__all__ = [
    "DEFAULTS",
    "PREFIX",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "RemoteReward",
    "RetryPolicy",
    "RewardServerError",
    "RewardServerTimeout",
    "RewardServerUnavailable",
    "decode_request",
    "encode_request",
    "info_from_json",
    "info_to_json",
]

PROTOCOL_VERSION = 1
SAFETENSORS_TYPE = "application/octet-stream"
JSON_TYPE = "application/json"
#: Names of the image tensors a request may carry.
IMAGE_INPUTS = ("images", *CONDITION_INPUTS)
#: Largest safetensors header accepted (prompts ride in it): far above any real batch's.
MAX_HEADER_BYTES = 64 * 1024 * 1024

#: The client's defaults: seconds, counts. ``timeout`` is the read timeout of one request
#: (queueing and scoring included); ``max_wait`` bounds all attempts and their backoff together.
DEFAULTS = {"timeout": 300.0, "connect_timeout": 5.0, "retries": 5, "backoff": 0.5, "max_wait": 120.0}
_ENV = {"timeout": "IMGALIGN_REMOTE_TIMEOUT", "connect_timeout": "IMGALIGN_REMOTE_CONNECT_TIMEOUT",
        "retries": "IMGALIGN_REMOTE_RETRIES", "backoff": "IMGALIGN_REMOTE_BACKOFF",
        "max_wait": "IMGALIGN_REMOTE_MAX_WAIT"}  # fmt: skip
#: The longest single backoff pause, whatever the attempt number or the server's Retry-After.
MAX_BACKOFF = 10.0


class ProtocolError(ValueError):
    """A request or answer that does not follow the protocol (the message says which part)."""


class RewardServerUnavailable(ConnectionError):
    """The reward server could not be reached (refused, reset, or its queue stayed full) after every retry."""


class RewardServerTimeout(TimeoutError):
    """The reward server did not answer within the timeout, on every attempt."""


class RewardServerError(OSError):
    """The reward server answered that the served reward failed (5xx); the message is the server's."""


# ============================================================================ the wire format
def _uint8_png(image: Tensor) -> bytes:
    """One ``[3,H,W]`` image in ``[0,1]`` as an 8-bit RGB PNG (rounded, as images are saved elsewhere)."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_request(images: Tensor, prompts: Sequence[str] | None = None, cond: dict[str, Tensor] | None = None, *,
                   format: str = "safetensors", details: bool = False) -> tuple[bytes, str]:  # fmt: skip
    """A ``POST /score`` body and its content type: ``format="safetensors"`` (exact) or ``"png"`` (8-bit)."""
    cond = dict(cond or {})
    if format == "safetensors":
        from safetensors.torch import save

        tensors = {"images": images, **cond}
        metadata = {"details": "1" if details else "0", "protocol": str(PROTOCOL_VERSION)}
        if prompts is not None:
            metadata["prompts"] = json.dumps(list(prompts))
        body = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        return body, SAFETENSORS_TYPE
    if format == "png":
        payload: dict = {"images": [base64.b64encode(_uint8_png(x)).decode("ascii") for x in images],
                         "details": bool(details), "protocol": PROTOCOL_VERSION}  # fmt: skip
        if prompts is not None:
            payload["prompts"] = list(prompts)
        for key, value in cond.items():
            payload[key] = [base64.b64encode(_uint8_png(x)).decode("ascii") for x in value]
        return json.dumps(payload).encode(), JSON_TYPE
    raise ValueError(f"format must be 'safetensors' or 'png', got {format!r}")


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (read without loading the tensors)."""
    if len(body) < 8:
        raise ProtocolError("the body is not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", body[:8])
    if length > min(len(body) - 8, MAX_HEADER_BYTES):
        raise ProtocolError("the body is not a safetensors file (its header length exceeds the body)")
    try:
        header = json.loads(body[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("the body is not a safetensors file (its header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _decode_pngs(values, key: str) -> Tensor:
    from .images import load_image

    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"{key!r} must be a non-empty list of base64-encoded PNG strings")
    images = []
    for i, value in enumerate(values):
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            raise ProtocolError(f"{key}[{i}] is not valid base64") from None
        images.append(load_image(data, name=f"{key}[{i}]"))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ProtocolError(f"the images of {key!r} differ in size ({sorted(shapes)}): send one size per request")
    return torch.cat(images)


def decode_request(body: bytes, content_type: str) -> tuple[Tensor, list[str] | None, dict[str, Tensor], bool]:
    """``(images, prompts, cond, details)`` from a ``POST /score`` body; :class:`ProtocolError` names what is wrong.

    Tensors are read with safetensors (never unpickled); images are returned as float32.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind == SAFETENSORS_TYPE:
        from safetensors import SafetensorError
        from safetensors.torch import load

        metadata = _safetensors_metadata(body)
        try:
            tensors = load(body)
        except SafetensorError as err:
            raise ProtocolError(f"the body is not a valid safetensors file ({err})") from None
        unknown = sorted(set(tensors) - set(IMAGE_INPUTS))
        if unknown:
            raise ProtocolError(f"unknown tensor(s) {unknown}; a request carries {list(IMAGE_INPUTS)}")
        if "images" not in tensors:
            raise ProtocolError("no 'images' tensor in the request")
        for key, value in tensors.items():
            if not value.is_floating_point():
                raise ProtocolError(f"{key!r} must be a float tensor in [0,1], got {value.dtype}")
        prompts = None
        if "prompts" in metadata:
            try:
                prompts = json.loads(metadata["prompts"])
            except json.JSONDecodeError:
                raise ProtocolError("the 'prompts' metadata is not a JSON list") from None
        images = tensors.pop("images").float()
        cond = {k: v.float() for k, v in tensors.items()}
        details = metadata.get("details", "0") == "1"
    elif kind == JSON_TYPE:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError(f"the body is not JSON ({err})") from None
        if not isinstance(payload, dict):
            raise ProtocolError("the JSON body must be an object with 'images' (and 'prompts', ...)")
        unknown = sorted(set(payload) - {*IMAGE_INPUTS, "prompts", "details", "protocol"})
        if unknown:
            raise ProtocolError(f"unknown field(s) {unknown}; known: images, prompts, details, "
                                f"{', '.join(CONDITION_INPUTS)}")  # fmt: skip
        if "images" not in payload:
            raise ProtocolError("no 'images' field in the request")
        images = _decode_pngs(payload["images"], "images")
        cond = {k: _decode_pngs(payload[k], k) for k in CONDITION_INPUTS if k in payload}
        prompts = payload.get("prompts")
        details = bool(payload.get("details", False))
    else:
        raise ProtocolError(f"Content-Type {content_type!r} is not {SAFETENSORS_TYPE} (safetensors) "
                            f"or {JSON_TYPE} (base64 PNGs)")  # fmt: skip
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)):
        raise ProtocolError("'prompts' must be a list of strings")
    return images, prompts, cond, details


def _json_safe(value):
    """``value`` if it survives JSON, else its ``str``: ``info.extra`` may hold anything."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def info_to_json(info: RewardInfo) -> dict:
    """A :class:`RewardInfo` as a JSON object (``extra`` values that are not JSON become strings)."""
    return {"name": info.name, "inputs": list(info.inputs), "differentiable": info.differentiable,
            "source": info.source, "score_range": list(info.score_range) if info.score_range else None,
            "mean": info.mean, "std": info.std, "higher_is_better": info.higher_is_better,
            "extra": {str(k): _json_safe(v) for k, v in info.extra.items()}}  # fmt: skip


def info_from_json(data: dict, url: str) -> RewardInfo:
    """The served reward's info, as the client presents it: not differentiable, its source the URL."""
    try:
        inputs = tuple(data["inputs"])
        unknown = [i for i in inputs if i not in ("images", "prompts", *CONDITION_INPUTS)]
        if unknown or "images" not in inputs:
            raise ProtocolError(f"inputs {list(inputs)} are not the reward contract's")
        score_range = tuple(float(v) for v in data["score_range"]) if data.get("score_range") else None
        return RewardInfo(
            name=str(data["name"]),
            inputs=inputs,
            differentiable=False,  # no gradient crosses the wire
            source=f"served by {url}: {data.get('source', '')}".rstrip(": "),
            score_range=score_range,
            mean=None if data.get("mean") is None else float(data["mean"]),
            std=None if data.get("std") is None else float(data["std"]),
            higher_is_better=bool(data.get("higher_is_better", True)),
            extra={**dict(data.get("extra") or {}), "url": url,
                   "served_differentiable": bool(data.get("differentiable", False))},  # fmt: skip
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"{url}/info is not a reward server's answer ({err}): is `imgalign serve-reward` "
                            "what listens there?") from None  # fmt: skip


# ============================================================================ the client
@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often the client tries: each attempt is bounded by the timeouts, all of
    them by ``max_wait``, their number by ``retries + 1``."""

    timeout: float
    connect_timeout: float
    retries: int
    backoff: float
    max_wait: float

    @classmethod
    def resolve(cls, **given) -> RetryPolicy:
        """Keyword options first, then the ``IMGALIGN_REMOTE_*`` environment, then :data:`DEFAULTS`."""
        values = {}
        for key, default in DEFAULTS.items():
            value = given.get(key)
            source = key
            if value is None and os.environ.get(_ENV[key], "").strip():
                value, source = os.environ[_ENV[key]].strip(), _ENV[key]
            if value is None:
                value = default
            try:
                number = int(value) if key == "retries" else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"remote reward: {source} must be a number, got {value!r}") from None
            if not math.isfinite(number) or number < 0 or (number == 0 and key not in ("retries", "backoff")):
                raise ValueError(f"remote reward: {source} must be a finite number "
                                 f"{'>= 0' if key in ('retries', 'backoff') else '> 0'}, got {value!r}")  # fmt: skip
            values[key] = number
        return cls(**values)

    def describe(self) -> str:
        return f"{self.retries + 1} attempt(s), timeout {self.timeout:g}s, at most {self.max_wait:g}s in all"


class _Transient(Exception):
    """One failed attempt worth retrying (refused, reset, timed out, or 503)."""

    def __init__(self, reason: str, timed_out: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.timed_out = timed_out
        self.retry_after = retry_after


class RemoteReward(Reward):
    """A reward scored by ``imgalign serve-reward`` at ``url``, under the reward contract.

    ``format``: ``"safetensors"`` sends float tensors (exact scores; 12 bytes a pixel) or
    ``"png"`` 8-bit PNGs (a few times smaller; the server sees the quantised image).
    ``max_images``: images per request (a larger call is split). Timeouts and retries: see the
    module docstring and :class:`RetryPolicy`. ``info`` is fetched from the server when the
    reward is built, so an unreachable server fails at load time, in one line.
    """

    def __init__(self, url: str, *, format: str = "safetensors", max_images: int = 64, timeout: float | None = None,
                 connect_timeout: float | None = None, retries: int | None = None, backoff: float | None = None,
                 max_wait: float | None = None) -> None:  # fmt: skip
        super().__init__()
        if format not in ("safetensors", "png"):
            raise ValueError(f"remote reward: format must be 'safetensors' or 'png', got {format!r}")
        if not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"remote reward: max_images must be an integer >= 1, got {max_images!r}")
        self.url, self._scheme, self._host, self._port, self._base = _parse_url(url)
        self.format = format
        self.max_images = max_images
        self.policy = RetryPolicy.resolve(timeout=timeout, connect_timeout=connect_timeout, retries=retries,
                                          backoff=backoff, max_wait=max_wait)  # fmt: skip
        served = self._request("GET", "/info")
        self.info = info_from_json(served, self.url)
        self.has_details = bool(served.get("has_details", False))
        self.served_protocol = served.get("protocol")

    # -- the contract ------------------------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str] | None, **cond: Tensor) -> Tensor:
        scores = [self._post(images[i : i + self.max_images], prompts and prompts[i : i + self.max_images],
                             {k: v[i : i + self.max_images] for k, v in cond.items()}, details=False)["scores"]
                  for i in range(0, images.shape[0], self.max_images)]  # fmt: skip
        values = torch.tensor([float(v) for chunk in scores for v in chunk], dtype=torch.float32)
        if values.numel() != images.shape[0]:
            raise ProtocolError(f"{self.url} answered {values.numel()} score(s) for {images.shape[0]} image(s)")
        return values.to(images.device)

    @torch.no_grad()
    def details(self, images: Tensor, prompts: str | Sequence[str] | None = None,
                **cond: Tensor) -> list[dict[str, float]] | None:  # fmt: skip
        """The served reward's per-image breakdown, or ``None`` when it has none (no request is made then)."""
        if not self.has_details:
            return None
        images, texts, extra = self.validate(images, prompts, **cond)
        rows: list[dict[str, float]] = []
        for i in range(0, images.shape[0], self.max_images):
            answer = self._post(images[i : i + self.max_images], texts and texts[i : i + self.max_images],
                                {k: v[i : i + self.max_images] for k, v in extra.items()}, details=True)  # fmt: skip
            if answer.get("details") is None:
                return None
            rows += [{k: float(v) for k, v in row.items()} for row in answer["details"]]
        return rows

    def health(self) -> dict:
        """The server's ``/health`` answer (name, device, queue depth, counters)."""
        return self._request("GET", "/health")

    def extra_repr(self) -> str:
        return f"url={self.url!r}, name={self.info.name!r}, format={self.format!r}"

    # -- HTTP ------------------------------------------------------------------------------------
    def _post(self, images: Tensor, prompts: list[str] | None, cond: dict[str, Tensor], *, details: bool) -> dict:
        body, content_type = encode_request(images, prompts, cond, format=self.format, details=details)
        return self._request("POST", "/score", body, content_type)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        """One call, retried on refused/reset connections, timeouts and 503 (bounded in count and time)."""
        policy = self.policy
        start = time.monotonic()
        deadline = start + policy.max_wait
        attempts = 0
        last: _Transient | None = None
        for attempt in range(policy.retries + 1):
            attempts = attempt + 1
            try:
                return self._attempt(method, path, body, content_type, deadline)
            except _Transient as err:
                last = err
            pause = min(policy.backoff * 2**attempt, MAX_BACKOFF)
            if last.retry_after is not None:
                pause = min(max(pause, last.retry_after), MAX_BACKOFF)
            if attempt == policy.retries or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        waited = time.monotonic() - start
        what = (f"reward server {self.url} did not answer {method} {path}: {last} "
                f"({attempts} attempt(s) in {waited:.1f}s)")  # fmt: skip
        hint = ("is `imgalign serve-reward` running there and reachable? Raise IMGALIGN_REMOTE_RETRIES / "
                "IMGALIGN_REMOTE_MAX_WAIT (or the reward's retries= / max_wait= options) to wait longer")  # fmt: skip
        if last is not None and last.timed_out:
            raise RewardServerTimeout(f"{what}; the server may be overloaded: raise IMGALIGN_REMOTE_TIMEOUT "
                                      f"(timeout=), or lower the batch size. {hint}")  # fmt: skip
        raise RewardServerUnavailable(f"{what}; {hint}")

    def _attempt(self, method: str, path: str, body: bytes | None, content_type: str | None, deadline: float) -> dict:
        policy = self.policy
        remaining = max(deadline - time.monotonic(), 0.001)
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=min(policy.connect_timeout, remaining))
        try:
            try:
                conn.connect()
                conn.sock.settimeout(min(policy.timeout, max(deadline - time.monotonic(), 0.001)))
                headers = {"Accept": JSON_TYPE}
                if body is not None:
                    headers["Content-Type"] = content_type or SAFETENSORS_TYPE
                conn.request(method, self._base + path, body=body, headers=headers)
                response = conn.getresponse()
                status, data = response.status, response.read()
                retry_after = response.getheader("Retry-After")
            except (TimeoutError, socket.timeout) as err:
                raise _Transient(f"timed out ({err or 'no answer'})", timed_out=True) from None
            except (ConnectionError, http.client.HTTPException) as err:  # refused, reset, cut off mid-answer
                raise _Transient(f"{type(err).__name__}: {err}".rstrip(": ")) from None
            except OSError as err:  # no route, unknown host: as refused, retrying can help (a restarting host)
                raise _Transient(f"{type(err).__name__}: {err}") from None
        finally:
            conn.close()
        message = _error_text(data)
        if status == 503:
            try:
                wait = float(retry_after) if retry_after else None
            except ValueError:
                wait = None
            raise _Transient(f"busy (503: {message})", retry_after=wait)
        if status >= 500:
            raise RewardServerError(f"reward server {self.url}: {method} {path} failed ({status}): {message}")
        if status >= 400:
            raise ValueError(f"reward server {self.url} refused the request ({status}): {message}")
        try:
            answer = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ProtocolError(f"{self.url}{path} did not answer JSON: is `imgalign serve-reward` what listens "
                                "there?") from None  # fmt: skip
        if not isinstance(answer, dict):
            raise ProtocolError(f"{self.url}{path} answered {type(answer).__name__}, not a JSON object")
        return answer


def _error_text(data: bytes) -> str:
    """The server's ``{"error": ...}`` message, or the start of whatever else it sent."""
    try:
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload:
            return " ".join(str(payload["error"]).split())
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    return " ".join(data[:200].decode("utf-8", "replace").split()) or "(empty answer)"


def _parse_url(url: str) -> tuple[str, str, str, int, str]:
    """``(url, scheme, host, port, base path)``, or a ``ValueError`` saying what a server URL looks like."""
    text = url.strip()
    if text.lower().startswith(PREFIX):
        text = text[len(PREFIX) :].strip()
    parts = urlsplit(text)
    example = "remote:http://127.0.0.1:8000"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"remote reward: {url!r} is not an http(s) URL with a host, e.g. {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"remote reward: {url!r} has a query or fragment; give options as reward options "
                         "(reward.json) or IMGALIGN_REMOTE_* variables")  # fmt: skip
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"remote reward: {url!r} has an invalid port, e.g. {example}") from None
    base = parts.path.rstrip("/")
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown_host}:{port}{base}", parts.scheme, host, port, base


def remote(url: str, **options) -> RemoteReward:
    """``rewards.load("remote:<url>", **options)``."""
    return RemoteReward(url, **options)
