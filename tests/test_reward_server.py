"""A reward served by another process: ``imgalign serve-reward`` and the ``remote:http://...`` client.

Remote scores equal in-process scores (bit for bit with tensors on the wire, and on the
quantised images with PNGs); concurrent requests are scored as one batch; a full queue answers
503 and the client retries; a dead server is one line after bounded retries (client and CLI);
and a ``filter`` whose server is killed mid-run loses nothing: ``--resume`` against a restarted
server finishes it, every item with exactly one score or error. Every wait here is bounded.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import rewards
from conftest import assert_one_line_errors
from imgalign.cli import classify, main
from imgalign.curation import read_parts
from rewards import Reward, RewardInfo
from rewards.remote import RemoteReward, RewardServerError, RewardServerUnavailable, encode_request
from rewards.server import RewardServer

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRIES = {"retries": 2, "backoff": 0.01, "max_wait": 30.0}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ============================================================================= helpers and stand-in rewards
def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Run ``fn(*args)`` on a daemon thread; its result or exception lands in the returned dict."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict):
    thread.join(timeout=60)
    assert not thread.is_alive(), "a request thread hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, content_type: str, path: str = "/score") -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class Gated(Reward):
    """Mean brightness, whose scoring waits for ``gate``: requests pile up in the queue meanwhile."""

    info = RewardInfo(name="test-gated-mean", inputs=("images",), differentiable=False)

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _score(self, images, prompts=None, **_):
        self.entered.set()
        assert self.gate.wait(timeout=60)
        return images.mean(dim=(1, 2, 3))


class EditDistance(Reward):
    """An edit reward: closeness to the source image, plus a little for a longer instruction."""

    info = RewardInfo(name="test-edit-distance", inputs=("images", "prompts", "source_images"))

    def _score(self, images, prompts, source_images):
        length = torch.tensor([len(p) for p in prompts], dtype=images.dtype, device=images.device)
        return -(images - source_images).abs().mean(dim=(1, 2, 3)) + 1e-3 * length


class Failing(Reward):
    info = RewardInfo(name="test-failing", inputs=("images",))

    def _score(self, images, prompts=None, **_):
        raise RuntimeError("the served model broke")


def quantised(images: torch.Tensor) -> torch.Tensor:
    """What a PNG round trip gives: 8-bit, rounded."""
    return (images.clamp(0, 1) * 255).round() / 255


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Reward:
    """The real CLIP-score architecture at a tiny size, random weights, loaded from a reward.json."""
    from safetensors.torch import save_file

    from rewards.clip_score import build_open_clip

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model, _ = build_open_clip(TINY_CLIP, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny_clip.safetensors"))
    (root / "reward.json").write_text(json.dumps(
        {"name": "clip", "options": {"arch": TINY_CLIP, "pretrained": None, "checkpoint": "./tiny_clip.safetensors"}}))
    return rewards.load(str(root / "reward.json")).eval()


@pytest.fixture(scope="module")
def shapes():
    """Eight Shapes images; half with their own caption, half with another image's (oracle scores differ)."""
    from imgalign.shapes.world import make_dataset

    pixels, captions, _ = make_dataset(8, seed=3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    prompts = [captions[i] if i % 2 == 0 else captions[(i + 3) % 8] for i in range(8)]
    return images, prompts


# ============================================================================= equality with the in-process reward
def test_remote_scores_equal_in_process_scores(tiny_clip):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 40, 40, generator=g)
    prompts = ["a red circle", "a blue square", "two green triangles", "a cat", "a white background"]
    # the no-gradient path, as a server runs it (with autograd on, torch may pick other kernels: ~1e-7 apart)
    expected = tiny_clip.score_batched(images, prompts)
    expected_png = tiny_clip.score_batched(quantised(images), prompts)
    with RewardServer(tiny_clip, max_batch=8) as server:
        exact = rewards.load(f"remote:{server.url}")
        assert not exact.info.differentiable and exact.info.name == tiny_clip.info.name
        assert exact.info.inputs == tiny_clip.info.inputs
        assert torch.equal(exact(images, prompts), expected)  # tensors on the wire: bit for bit
        assert torch.equal(exact.score_batched(images, prompts, batch_size=5), expected)
        png = rewards.load(f"remote:{server.url}", format="png")
        assert torch.equal(png(images, prompts), expected_png)  # PNGs: the in-process score of the 8-bit image
        # a call larger than max_images is split into several requests, in order
        split = rewards.load(f"remote:{server.url}", max_images=2)
        torch.testing.assert_close(split(images, prompts), expected, rtol=1e-6, atol=1e-6)
        health = exact.health()
    assert health["reward"] == tiny_clip.info.name and health["device"] == "cpu" and health["errors"] == 0


@pytest.mark.parametrize("format", ["safetensors", "png"])
def test_edit_rewards_get_their_source_images_and_instructions(format):
    reward = EditDistance()
    g = torch.Generator().manual_seed(1)
    images, sources = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    instructions = ["make it red", "remove the square", "x"]
    with RewardServer(reward) as server:
        remote = rewards.load(f"remote:{server.url}", format=format)
        assert remote.info.inputs == ("images", "prompts", "source_images")
        got = remote(images, instructions, source_images=sources)
        one_source = remote(images, instructions, source_images=sources[:1])  # one source for every image
        with pytest.raises(ValueError, match="source_images"):
            remote(images, instructions)  # refused by the contract before anything is sent
    if format == "png":
        images, sources = quantised(images), quantised(sources)
    torch.testing.assert_close(got, reward(images, instructions, source_images=sources), rtol=0, atol=1e-6)
    torch.testing.assert_close(one_source, reward(images, instructions, source_images=sources[:1]), rtol=0, atol=1e-6)


def test_the_oracle_served_gives_its_scores_and_its_details(shapes):
    images, prompts = shapes
    oracle = rewards.load("shapes-oracle")
    with RewardServer(oracle) as server:
        remote = rewards.load(f"remote:{server.url}")
        assert torch.equal(remote(images, prompts), oracle(images, prompts))
        assert remote.details(images, prompts) == oracle.details(images, prompts)
        weighted = rewards.load(f"remote:{server.url}=0.5,jpeg-compressibility=1")  # a member of a weighted spec
        assert isinstance(weighted.member(f"remote:{server.url}"), RemoteReward)


# ============================================================================= batching and the bounded queue
def test_concurrent_requests_are_scored_as_one_batch():
    reward = Gated()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with RewardServer(reward, max_batch=8, queue_size=8) as server:
        client = RemoteReward(server.url, retries=0)
        first = in_thread(client, images[0:1])
        assert reward.entered.wait(30), "the first request never reached the reward"
        rest = [in_thread(client, images[i : i + 1]) for i in range(1, 4)]  # they queue behind the first
        wait_until(lambda: client.health()["queue_depth"] == 3, "three queued requests")
        reward.gate.set()
        results = [joined(*first)] + [joined(*r) for r in rest]
        health = client.health()
    for i, value in enumerate(results):
        assert torch.equal(value, images[i : i + 1].mean(dim=(1, 2, 3)))
    assert health["requests"] == 4 and health["batches"] == 2 and health["largest_batch"] == 3, health


def test_a_full_queue_answers_503_and_the_client_retries_until_it_is_scored():
    reward = Gated()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with RewardServer(reward, max_batch=8, queue_size=1) as server:
        client = RemoteReward(server.url, retries=0)
        first = in_thread(client, images[0:1])
        assert reward.entered.wait(30)
        second = in_thread(client, images[1:2])
        wait_until(lambda: client.health()["queue_depth"] == 1, "a full queue")
        status, payload = post(server.url, *encode_request(images[2:3]))
        assert status == 503 and "queue is full" in payload["error"], payload
        with pytest.raises(RewardServerUnavailable, match="503"):
            client(images[2:3])  # no retries: the busy answer, as one line
        patient = RemoteReward(server.url, retries=20, backoff=0.05, max_wait=60)
        third = in_thread(patient, images[2:3])
        wait_until(lambda: client.health()["rejected"] >= 3, "the patient client's first 503")
        reward.gate.set()
        results = [joined(*first), joined(*second), joined(*third)]
    for i, value in enumerate(results):
        assert torch.equal(value, images[i : i + 1].mean(dim=(1, 2, 3)))


# ============================================================================= errors
def test_bad_requests_and_failing_rewards_answer_one_json_line():
    with RewardServer(EditDistance()) as server:
        status, payload = post(server.url, b"not safetensors", "application/octet-stream")
        assert status == 400 and "safetensors" in payload["error"]
        status, payload = post(server.url, b"{}", "application/json")
        assert status == 400 and "images" in payload["error"]
        status, payload = post(server.url, b"x", "text/plain")
        assert status == 400 and "Content-Type" in payload["error"]
        body, kind = encode_request(torch.rand(2, 3, 8, 8), ["a", "b"])  # no source_images for an edit reward
        status, payload = post(server.url, body, kind)
        assert status == 400 and "source_images" in payload["error"]
        status, payload = post(server.url, body, kind, path="/nowhere")
        assert status == 404 and "/score" in payload["error"]
    lines = []
    with RewardServer(Failing(), log=lines.append) as server:
        remote = rewards.load(f"remote:{server.url}")
        with pytest.raises(RewardServerError, match="the served model broke") as caught:
            remote(torch.rand(1, 3, 8, 8))
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)
    assert len(lines) == 1 and "the served model broke" in lines[0]  # logged once, on the server
    assert classify(caught.value)[0] == 2


def test_a_killed_server_is_one_line_after_bounded_retries(tiny_clip, tmp_path):
    server = RewardServer(tiny_clip).start()
    (tmp_path / "reward.json").write_text(json.dumps({"name": f"remote:{server.url}", "options": FAST_RETRIES}))
    remote = rewards.load(str(tmp_path / "reward.json"))  # the client's options in a reward.json
    assert remote.policy.retries == 2 and remote.policy.backoff == 0.01
    server.stop()
    with pytest.raises(RewardServerUnavailable) as caught:
        remote(torch.rand(1, 3, 8, 8), "a red circle")
    message = str(caught.value)
    assert "\n" not in message and server.url in message and "serve-reward" in message
    assert "3 attempt(s)" in message  # retries=2: three attempts, then the error
    assert classify(caught.value) == (2, message)  # the command line's boundary: one line, exit 2
    with pytest.raises(ValueError, match="not an http"):
        rewards.load("remote:127.0.0.1")
    with pytest.raises(ValueError, match="does not take the option 'retry'"):
        rewards.load(f"remote:{server.url}", retry=3)


def test_score_against_a_dead_port_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from imgalign.images import save_png

    (tmp_path / "images").mkdir()
    save_png(torch.rand(3, 16, 16), tmp_path / "images" / "a.png")
    monkeypatch.setenv("IMGALIGN_REMOTE_RETRIES", "1")
    monkeypatch.setenv("IMGALIGN_REMOTE_BACKOFF", "0.01")
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["score", "--reward", f"remote:{url}", "--images", str(tmp_path / "images"), "--prompt", "a red circle",
                 "--device", "cpu", "--out", str(tmp_path / "scores.jsonl")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert url in err and "serve-reward" in err and "2 attempt(s)" in err
    assert not (tmp_path / "scores.jsonl").exists()


# ============================================================================= filter: a server killed mid-run
def _start_server_process(port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``imgalign serve-reward`` in its own process; its URL from the first line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "imgalign.cli", "serve-reward", "--reward", "shapes-oracle",
                             "--port", str(port), "--device", "cpu", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT)  # fmt: skip
    thread, out = in_thread(proc.stdout.readline)
    thread.join(timeout=180)
    match = re.search(r" on (http://\S+) ", out.get("value", ""))
    if match is None:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"serve-reward did not start: {out} {log.read_text()[-2000:]}")
    return proc, match.group(1)


def test_filter_loses_nothing_when_its_server_is_killed_and_resume_finishes(shapes, tmp_path, monkeypatch, capsys):
    from imgalign.images import save_png

    images, prompts = shapes
    (tmp_path / "images").mkdir()
    records = []
    for i in range(len(images)):
        save_png(images[i], tmp_path / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "prompt": prompts[i]})
    records[1]["image"] = "images/missing.png"  # an item whose error is its own
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("IMGALIGN_REMOTE_RETRIES", "2")
    monkeypatch.setenv("IMGALIGN_REMOTE_BACKOFF", "0.01")

    proc, url = _start_server_process(0, tmp_path / "server.log")
    port = int(url.rsplit(":", 1)[1])
    requests = []
    post_once = RemoteReward._post

    def killing_post(self, *args, **kwargs):  # the server dies before the third batch's request
        requests.append(1)
        if len(requests) == 3:
            proc.kill()
            proc.wait(timeout=30)
        return post_once(self, *args, **kwargs)

    out = tmp_path / "out"
    argv = ["filter", "--data", str(tmp_path / "items.jsonl"), "--reward", f"remote:{url}", "--threshold", "0.5",
            "--batch-size", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    try:
        monkeypatch.setattr(RemoteReward, "_post", killing_post)
        assert main(argv) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert url in err and "--resume" in err
    done = read_parts(out)  # raises if any item appears twice
    assert sorted(done) == [0, 1, 2, 3]  # the two batches before the kill; the third is not written
    assert "does not exist" in done[1]["error"] and all("score" in done[i] for i in (0, 2, 3))

    monkeypatch.setattr(RemoteReward, "_post", post_once)
    with RewardServer(rewards.load("shapes-oracle"), port=port):  # restarted where it was
        assert main([*argv, "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    assert all(("score" in r) != ("error" in r) for r in rows)
    expected = rewards.load("shapes-oracle")(images, prompts)
    for r in rows:
        if "score" in r:
            assert r["score"] == float(expected[r["index"]])
    assert {r["index"] for r in rows if "error" in r} == {1}
    assert len({r["score"] for r in rows if "score" in r}) > 1  # right and wrong captions: the cut means something


# ============================================================================= trainers and the command line
def test_trainers_call_a_remote_reward_through_the_same_helper(shapes):
    from imgalign.train.pipeline import reward_device, score

    images, prompts = shapes
    oracle = rewards.load("shapes-oracle")
    with RewardServer(oracle) as server:
        remote = rewards.load(f"remote:{server.url}")
        assert reward_device(remote) is None  # scores wherever its inputs are
        assert torch.equal(score(remote, images, prompts), oracle(images, prompts))


def test_reward_device_is_a_config_key_checked_in_one_line(capsys):
    assert main(["train", "grpo", "--print-config", "pipeline=shapes", "reward=shapes-oracle", "reward_device=cpu"]) == 0
    assert "reward_device: cpu" in capsys.readouterr().out
    assert_one_line_errors(main, "grpo", "shapes", "shapes-oracle", {"reward_device=gpu9": "reward_device='gpu9'"},
                           capsys)  # fmt: skip


def test_reward_backprop_refuses_a_remote_reward_in_one_line(tmp_path, capsys):
    with RewardServer(rewards.load("shapes-oracle")) as server:
        code = main(["train", "refl", "pipeline=shapes", f"reward=remote:{server.url}", f"output_dir={tmp_path / 'run'}",
                     "train.max_steps=1", "train.report_to=[]", "data.prompts=[\"a red circle\"]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not differentiable" in err, err


def test_serve_reward_help_does_not_import_torch():
    code = ("import sys; from imgalign.cli import main\ntry:\n    main(['serve-reward', '--help'])\n"
            "except SystemExit as e:\n    rc = e.code\nassert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "--max-batch" in done.stdout, done.stderr[-2000:]


def test_serve_reward_refuses_bad_values_in_one_line(capsys):
    for argv, culprit in ((["--port", "70000"], "--port"), (["--port", "0", "--max-batch", "0"], "--max-batch"),
                          (["--port", "0", "--queue", "0"], "--queue")):  # fmt: skip
        assert main(["serve-reward", "--reward", "shapes-oracle", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and culprit in err[0], err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve-reward", "--reward", "shapes-oracle", "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already in use" in err[0], err

