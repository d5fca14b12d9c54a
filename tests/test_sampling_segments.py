"""The segment-routed sampler (timestep-segment DPO): each LoRA runs exactly in its noise range."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import pipelines
from imgalign.cli import main
from imgalign.images import load_image
from imgalign.sampling import (
    SegmentRouting,
    load_routing,
    load_segment_loras,
    plan_segments,
    run_sampler,
    sample_segments,
    save_routing,
)
from pipelines.architectures import build_pipeline

SIZE, STEPS, GUIDANCE = 32, 6, 4.0
PROMPTS = ["a red circle"]
TWO = SegmentRouting([0.0, 0.5, 1.0], ["seg0", "seg1"])


def _gens():
    return [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]


def _kwargs(**extra):
    return dict(num_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=_gens(), **extra)


def _add_loras(adapter, names, seed=0):
    """Named LoRAs with visibly different, non-zero B matrices."""
    for name in names:
        pipelines.add_lora(adapter, rank=4, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipelines.unwrap_model(adapter.denoiser).named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _lora_flags(adapter):
    return {n: p.requires_grad for n, p in pipelines.unwrap_model(adapter.denoiser).named_parameters() if "lora_" in n}


def _recording(adapter, monkeypatch):
    """Record (noise level, active LoRAs) at every model prediction."""
    calls = []
    predict = adapter.predict

    def wrapped(latents, schedule, i, cond, **kwargs):
        calls.append((adapter.noise_level(schedule, i), pipelines.active_loras(adapter)))
        return predict(latents, schedule, i, cond, **kwargs)

    monkeypatch.setattr(adapter, "predict", wrapped)
    return calls


@pytest.fixture(scope="module", params=["sd3", "sd15"])  # flow-matching Euler (shift 3) and DDIM (epsilon)
def routed(request, tmp_path_factory):
    """A tiny pipeline with LoRAs seg0 and seg1 (saved too), and the images of each alone."""
    family = request.param
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    _add_loras(adapter, ["seg0", "seg1"])
    lora_dir = tmp_path_factory.mktemp(f"{family}-loras")
    for name in ("seg0", "seg1"):
        pipelines.save_lora(adapter, lora_dir / name, adapter_name=name)
    alone = {}
    for name in ("seg0", "seg1", None):
        with pipelines.lora_state_restored(adapter):
            pipelines.set_active_lora(adapter, name)
            alone[name] = adapter.sample(PROMPTS, **_kwargs())
    assert (alone["seg0"] - alone["seg1"]).abs().max() > 1e-3  # the two LoRAs differ visibly
    return family, adapter, lora_dir, alone


# ============================================================================ pipelines: switching adapters
def test_set_active_lora_switches_exactly_one_adapter_and_restores(routed):
    _, adapter, _, _ = routed
    assert pipelines.lora_names(adapter) == ["seg0", "seg1"]
    flags_before, active_before = _lora_flags(adapter), pipelines.active_loras(adapter)
    with pipelines.lora_state_restored(adapter):
        pipelines.set_active_lora(adapter, "seg0")
        assert pipelines.active_loras(adapter) == ["seg0"]
        flags = _lora_flags(adapter)  # peft: the active adapter trains, the others are frozen
        assert all(flag == (".seg0." in n) for n, flag in flags.items())
        pipelines.set_active_lora(adapter, None)
        assert pipelines.active_loras(adapter) == []
        pipelines.set_active_lora(adapter, "seg1")
        assert pipelines.active_loras(adapter) == ["seg1"]
        with pytest.raises(ValueError, match="no LoRA adapter named 'nope'.*loaded: seg0, seg1") as exc:
            pipelines.set_active_lora(adapter, "nope")
        assert "\n" not in str(exc.value)
    assert pipelines.active_loras(adapter) == active_before and _lora_flags(adapter) == flags_before


# ============================================================================ routing
def test_routing_activates_exactly_the_segments_adapter_at_every_step(routed, monkeypatch):
    _, adapter, _, _ = routed
    flags_before, active_before = _lora_flags(adapter), pipelines.active_loras(adapter)
    for routing in (TWO, SegmentRouting([0.0, 0.5, 1.0], [None, "seg1"])):
        calls = _recording(adapter, monkeypatch)
        sample_segments(adapter, PROMPTS, routing, **_kwargs())
        assert len(calls) == STEPS
        levels = [level for level, _ in calls]
        assert levels == sorted(levels, reverse=True) and levels[0] >= 0.5 > levels[-1]  # both segments visited
        for level, active in calls:
            expected = routing.adapters[0 if level < 0.5 else 1]
            assert active == ([] if expected is None else [expected]), (level, active)
        monkeypatch.undo()
    # the adapters are as they were: same active adapter, same requires_grad flags
    assert pipelines.active_loras(adapter) == active_before and _lora_flags(adapter) == flags_before


def test_two_segments_differ_from_either_lora_alone(routed):
    _, adapter, _, alone = routed
    both = sample_segments(adapter, PROMPTS, TWO, **_kwargs())
    assert (both - alone["seg0"]).abs().max() > 1e-3 and (both - alone["seg1"]).abs().max() > 1e-3
    # the whole range routed to one adapter is that adapter alone
    only_seg1 = sample_segments(adapter, PROMPTS, SegmentRouting([0.0, 0.5, 1.0], ["seg1", "seg1"]), **_kwargs())
    torch.testing.assert_close(only_seg1, alone["seg1"], atol=1e-6, rtol=0)
    base = run_sampler("segments", adapter, PROMPTS, routing=SegmentRouting([0.0, 1.0], [None]), **_kwargs())
    torch.testing.assert_close(base, alone[None], atol=1e-6, rtol=0)


def test_a_single_segment_equals_the_plain_lora_sampler(routed):
    family, _, lora_dir, _ = routed
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    pipelines.load_lora(adapter, lora_dir / "seg0")  # as "default", like `imgalign sample --lora DIR`
    plain = run_sampler("ode", adapter, PROMPTS, **_kwargs())
    routed_images = run_sampler("segments", adapter, PROMPTS, routing=SegmentRouting([0.0, 1.0], ["default"]), **_kwargs())
    assert torch.equal(routed_images, plain)


# ============================================================================ step skipping
def test_skip_runs_the_segment_with_k_steps_over_the_same_noise_range(routed, monkeypatch):
    _, adapter, _, alone = routed
    full = plan_segments(adapter, TWO, STEPS, height=SIZE, width=SIZE)
    assert full.function_evaluations == STEPS and sum(full.steps_per_segment) == STEPS
    for k, K in ((1, 1), (0, 2)):
        calls = _recording(adapter, monkeypatch)
        images = sample_segments(adapter, PROMPTS, TWO, skip={k: K}, **_kwargs())
        monkeypatch.undo()
        plan = plan_segments(adapter, TWO, STEPS, skip={k: K}, height=SIZE, width=SIZE)
        expected_calls = STEPS - full.steps_per_segment[k] + K
        assert len(calls) == plan.function_evaluations == expected_calls
        assert plan.steps_per_segment[k] == K and plan.steps_per_segment[1 - k] == full.steps_per_segment[1 - k]
        by_segment = {s: [lv for lv, _ in calls if TWO.segment_of(lv) == s] for s in (0, 1)}
        original = {s: [lv for lv, s2 in zip(full.noise_levels, full.segments, strict=True) if s2 == s] for s in (0, 1)}
        assert len(by_segment[k]) == K
        assert by_segment[1 - k] == pytest.approx(original[1 - k], abs=1e-6)  # the other segment is untouched
        assert by_segment[k][0] == pytest.approx(original[k][0], abs=1e-6)  # same range: first level ...
        if K > 1:  # ... to last level, evenly spaced
            assert by_segment[k][-1] == pytest.approx(original[k][-1], abs=1e-6)
            assert np.diff(by_segment[k]) == pytest.approx(np.diff(by_segment[k])[0], abs=2e-3)
        assert all(active == [TWO.adapters[TWO.segment_of(lv)]] for lv, active in calls)  # still routed
        assert torch.isfinite(images).all() and (images - alone["seg0"]).abs().max() > 1e-4
    assert type(adapter.scheduler).__name__ == ("FlowMatchEulerDiscreteScheduler" if adapter.is_flow else "DDIMScheduler")


def test_skip_with_the_original_count_on_an_even_schedule_reproduces_the_run(routed):
    """DDIM's timesteps, and flow sigmas without shift, are evenly spaced: re-spacing changes nothing."""
    _, adapter, _, _ = routed
    original = adapter.scheduler
    if adapter.is_flow:
        adapter.set_scheduler(FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=1.0))
    unshifted = adapter.scheduler
    try:
        counts = plan_segments(adapter, TWO, STEPS, height=SIZE, width=SIZE).steps_per_segment
        assert min(counts) >= 2
        plain = sample_segments(adapter, PROMPTS, TWO, **_kwargs())
        skipped = sample_segments(adapter, PROMPTS, TWO, skip=dict(enumerate(counts)), **_kwargs())
        torch.testing.assert_close(skipped, plain, atol=1e-5, rtol=0)
        assert adapter.scheduler is unshifted  # the plan's own scheduler was swapped out again
    finally:
        adapter.set_scheduler(original)


def test_skip_errors_are_one_clear_line(routed):
    _, adapter, _, _ = routed
    cases = [({2: 3}, "segments 0..1"), ({0: 0}, "at least 1 step")]
    if not adapter.is_flow:
        cases.append(({0: 10_000}, "cannot take 10000 distinct steps"))
    for skip, message in cases:
        with pytest.raises(ValueError, match=message) as exc:
            plan_segments(adapter, TWO, STEPS, skip=skip, height=SIZE, width=SIZE)
        assert "\n" not in str(exc.value)
    one_step = SegmentRouting([0.0, 0.1, 1.0], ["seg0", "seg1"])  # seg0 holds only the last step
    with pytest.raises(ValueError, match=r"cannot (be spread over|take) 2"):
        plan_segments(adapter, one_step, STEPS, skip={0: 2}, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"holds no step of a 6-step"):
        plan_segments(adapter, SegmentRouting([0.0, 1e-4, 1.0], ["seg0", "seg1"]), STEPS, skip={0: 1}, height=SIZE, width=SIZE)
    original = adapter.scheduler
    adapter.set_scheduler("euler" if not adapter.is_flow else _heun(original))
    try:
        with pytest.raises(ValueError, match="step skipping needs") as exc:
            plan_segments(adapter, TWO, STEPS, skip={0: 2}, height=SIZE, width=SIZE)
        assert "\n" not in str(exc.value)
    finally:
        adapter.set_scheduler(original)
    with pytest.raises(ValueError, match="'seg7' is not loaded"):
        sample_segments(adapter, PROMPTS, SegmentRouting([0.0, 1.0], ["seg7"]), **_kwargs())


def _heun(scheduler):
    from diffusers import FlowMatchHeunDiscreteScheduler

    return FlowMatchHeunDiscreteScheduler.from_config(scheduler.config)


# ============================================================================ routing file
def test_routing_round_trip_and_one_line_errors(tmp_path):
    routing = SegmentRouting([0, 0.3, 0.7, 1], ["seg0", None, "layout"])
    path = save_routing(routing, tmp_path / "lora")
    assert path == tmp_path / "lora" / "routing.json"
    assert json.loads(path.read_text()) == {"format": "imgalign-segment-routing", "version": 1,
                                            "boundaries": [0.0, 0.3, 0.7, 1.0], "adapters": ["seg0", None, "layout"]}  # fmt: skip
    assert load_routing(tmp_path / "lora") == routing and load_routing(path) == routing
    assert [p.name for p in (tmp_path / "lora").iterdir()] == ["routing.json"]  # no temporary file left behind
    assert [routing.segment_of(x) for x in (0.0, 0.29, 0.3, 0.69, 0.7, 0.99, 1.0)] == [0, 0, 1, 1, 2, 2, 2]
    assert SegmentRouting.even(["a", "b", "c", "d"]).boundaries == [0.0, 0.25, 0.5, 0.75, 1.0]

    bad_files = {"missing": None, "not json": "{", "wrong format": '{"format": "x"}',
                 "version": '{"format": "imgalign-segment-routing", "version": 9, "boundaries": [0, 1], "adapters": ["a"]}',
                 "boundaries": '{"format": "imgalign-segment-routing", "version": 1, "boundaries": [0, 0.7, 0.5, 1], "adapters": ["a", "b", "c"]}'}  # fmt: skip
    messages = {"missing": "segment routing file not found", "not json": "is not valid JSON",
                "wrong format": "is not a segment routing file", "version": "routing version 9",
                "boundaries": "must increase strictly from 0 to 1"}  # fmt: skip
    for case, text in bad_files.items():
        directory = tmp_path / case.replace(" ", "_")
        directory.mkdir()
        if text is not None:
            (directory / "routing.json").write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=messages[case]) as exc:
            load_routing(directory)
        assert str(directory / "routing.json") in str(exc.value) and "\n" not in str(exc.value)

    for boundaries, adapters, message in [
        ([0.1, 1], ["a"], "from 0 to 1"), ([0, 0.5, 0.5, 1], ["a", "b", "c"], "increase strictly"),
        ([0, 0.5, 1], ["a"], "need 2 adapters, got 1"), ([0, 1], ["../x"], "plain names"), ([0], [], "from 0 to 1"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message) as exc:
            SegmentRouting(boundaries, adapters)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"lies in \[0, 1\]"):
        routing.segment_of(1.5)


# ============================================================================ command line
@pytest.fixture(scope="module")
def cli_loras(sd15_dir, tmp_path_factory):
    """seg0 and seg1 LoRAs for the conftest SD1.5 pipeline, plus a routing directory holding both."""
    adapter = pipelines.load(sd15_dir)
    _add_loras(adapter, ["seg0", "seg1"], seed=1)
    root = tmp_path_factory.mktemp("cli-loras")
    for name in ("seg0", "seg1"):
        pipelines.save_lora(adapter, root / "routed" / name, adapter_name=name)
    save_routing(TWO, root / "routed" / "routing.json")
    return root / "routed"


def _sample(sd15_dir, out, *extra):
    args = ["sample", "--pipeline", sd15_dir, "--prompt", "a red circle", "--steps", "4", "--height", "32",
            "--width", "32", "--guidance", "4", *extra, "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return load_image(out / "0000.png"), [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_sample_cli_segments(sd15_dir, cli_loras, tmp_path):
    seg0, seg1 = f"seg0={cli_loras / 'seg0'}", f"seg1={cli_loras / 'seg1'}"
    named, records = _sample(sd15_dir, tmp_path / "named", "--sampler", "segments", "--lora", seg0, "--lora", seg1,
                             "--skip", "seg1:1")  # fmt: skip
    assert (tmp_path / "named" / "grid.png").is_file() and named.shape == (1, 3, 32, 32)
    record = records[0]
    assert record["sampler"] == "segments" and record["skip"] == {"seg1": 1}
    assert record["routing"] == {"boundaries": [0.0, 0.5, 1.0], "adapters": ["seg0", "seg1"]}
    assert record["lora"] == {"seg0": str(cli_loras / "seg0"), "seg1": str(cli_loras / "seg1")}
    # DDIM, 4 steps: timesteps 751, 501 (seg1) and 251, 1 (seg0); seg1 skipped to one step
    assert record["steps_per_segment"] == [2, 1] and record["function_evaluations"] == 3

    from_file, records = _sample(sd15_dir, tmp_path / "file", "--sampler", "segments", "--lora", str(cli_loras),
                                 "--skip", "seg1:1")  # fmt: skip
    assert records[0]["routing"] == record["routing"] and records[0]["lora"] == str(cli_loras)
    assert torch.equal(named, from_file)  # routing.json routes like the names

    # one LoRA directory: the segments sampler is the plain LoRA sampler
    ode, _ = _sample(sd15_dir, tmp_path / "ode", "--lora", str(cli_loras / "seg0"))
    single, records = _sample(sd15_dir, tmp_path / "single", "--sampler", "segments", "--lora", str(cli_loras / "seg0"))
    assert torch.equal(ode, single) and records[0]["routing"] == {"boundaries": [0.0, 1.0], "adapters": ["default"]}


def test_load_segment_loras_loads_each_segment_under_its_name(sd15_dir, cli_loras, tmp_path):
    adapter = pipelines.load(sd15_dir)
    routing = load_routing(cli_loras)
    assert load_segment_loras(adapter, routing, cli_loras) == ["seg0", "seg1"]
    assert pipelines.lora_names(adapter) == ["seg0", "seg1"]
    with pytest.raises(ValueError, match="'seg0' is already loaded"):
        load_segment_loras(adapter, routing, cli_loras)
    with pytest.raises(FileNotFoundError, match="LoRA directory not found: .*missing"):
        load_segment_loras(pipelines.load(sd15_dir), SegmentRouting([0.0, 1.0], ["missing"]), tmp_path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "segments"], "--sampler segments needs LoRAs"),
        (["--sampler", "segments", "--lora", "layout=DIR"], "unknown segment name 'layout'"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--skip", "seg0:0"], "at least 1 step"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--skip", "seg3:2"], "no segment 3 (segments: seg0..seg0)"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--skip", "seg0"], "--skip takes segK:STEPS"),
        (["--sampler", "segments", "--lora", "seg1=SEG0", "--segments", "0,1"], "makes 1 segments"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--segments", "0,0.7,0.2,1"], "increase strictly"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--segments", "0,half,1"], "--segments takes noise levels"),
        (["--sampler", "segments", "--lora", "seg0=SEG0", "--lora", "seg0=SEG0"], "given twice"),
        (["--sampler", "segments", "--lora", "seg0=MISSING"], "LoRA directory not found"),
        (["--lora", "seg0=SEG0"], "need --sampler segments"),
        (["--lora", "ROUTED"], "need --sampler segments"),
        (["--skip", "seg0:2"], "options of --sampler segments"),
    ],
)
def test_sample_cli_segment_errors_are_one_line(sd15_dir, cli_loras, tmp_path, capsys, extra, message):
    paths = {"SEG0": str(cli_loras / "seg0"), "ROUTED": str(cli_loras), "MISSING": str(tmp_path / "missing")}
    extra = [next((e.replace(k, v) for k, v in paths.items() if k in e), e) for e in extra]
    code = main(["sample", "--pipeline", sd15_dir, "--prompt", "x", *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("imgalign sample: error:") and message in err[0], err[0]
