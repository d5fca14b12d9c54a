"""``imgalign serve-reward``: serve one reward over HTTP, so trainers and commands elsewhere can call it.

    imgalign serve-reward --reward editreward --device cuda:1 --port 8000
    imgalign score --reward remote:http://127.0.0.1:8000 --images runs/sample --prompt "..." --out scores.jsonl

The served reward is any ``--reward`` spec the other commands take (a name, a weighted spec, a
``reward.json``). One worker owns the model and scores queued requests in batches of up to
``--max-batch`` images; ``--queue`` requests may wait, one more is answered 503 (the client
retries). The protocol and the client are in :mod:`rewards.remote`, the server in
:mod:`rewards.server`. The first line printed says where it listens (``--port 0`` picks a free
port); Ctrl-C stops it.
"""

from __future__ import annotations

import argparse

from imgalign.commands import CommandError, blame, resolve_device

HELP = "Serve a reward over HTTP (batched, bounded queue) for remote:http://HOST:PORT clients."

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="reward name(s) and weights (hpsv2.1, hpsv2.1=1,clip=0.5) or a reward.json / trained reward dir")
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint for a single named reward")
    parser.add_argument("--port", type=int, required=True, metavar="N", help="TCP port (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                             "no authentication)")
    parser.add_argument("--device", default=None, help="the reward's device: cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--max-batch", type=int, default=32, metavar="B", help="images scored together at most")
    parser.add_argument("--queue", type=int, default=64, metavar="Q",
                        help="requests that may wait; one more is answered 503 and retried by the client")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="a request not scored within this time is answered 504")
    parser.add_argument("--max-request-mb", type=float, default=1024.0, metavar="MB",
                        help="largest request body accepted (413 above)")


def _check(args: argparse.Namespace) -> None:
    import math

    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be in 0..65535, got {args.port}")
    for option, value in (("--max-batch", args.max_batch), ("--queue", args.queue)):
        if value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    for option, value in (("--request-timeout", args.request_timeout), ("--max-request-mb", args.max_request_mb)):
        if not math.isfinite(value) or value <= 0:
            raise CommandError(f"{option} must be a positive number, got {value}")


def _load(spec: str, checkpoint: str | None):
    import rewards

    if checkpoint is not None:
        with blame("--checkpoint", checkpoint):
            return rewards.load(spec, checkpoint=checkpoint)
    with blame("--reward", spec):
        return rewards.load(spec)


def run(args: argparse.Namespace) -> int:
    import errno

    _check(args)
    if args.reward.strip().lower().startswith("remote:"):
        raise CommandError("--reward: a remote reward is already served; give the reward itself (e.g. hpsv2.1)")
    device = resolve_device(args.device)
    reward = _load(args.reward, args.checkpoint)
    reward = reward.to(device).eval().requires_grad_(False)

    from rewards.server import RewardServer

    try:
        server = RewardServer(reward, host=args.host, port=args.port, max_batch=args.max_batch, queue_size=args.queue,
                              request_timeout=args.request_timeout,
                              max_body_bytes=int(args.max_request_mb * 1024 * 1024))  # fmt: skip
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise CommandError(f"--port {args.port}: the address {args.host}:{args.port} is already in use; choose "
                               "another port (or 0 for any free one), or stop what listens there") from None  # fmt: skip
        if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise CommandError(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror})") from None
        raise
    print(f"serving {reward.info.name} on {server.url} (device {device}, max batch {args.max_batch}, queue "
          f"{args.queue}); clients: --reward remote:{server.url}; Ctrl-C stops", flush=True)  # fmt: skip
    if args.host not in LOOPBACK:
        print(f"note: listening on {args.host} without authentication: anyone who can reach it can use the reward",
              flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
        print("stopped", flush=True)
    return 0
