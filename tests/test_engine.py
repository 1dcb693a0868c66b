"""The engine on the CPU: the golden cases amid other traffic with requests arriving mid-flight,
each request's output exactly as alone (modes, parameters and seeds mixed in one batch), admission
into a full pool, chunked prefill, streaming, aborts, refusals and the memory plan."""

import pytest
import torch
from conftest import load_cases

from twotower_rt.engine import Engine, plan_pool, slot_bytes
from twotower_rt.engine.pool import SlotPool

CASES = load_cases("cases.jsonl")


def check_golden(out, case):
    assert case["input_ids"] + out.generated == case["output_ids"], case["id"]
    assert out.finished
    assert out.finish_reason == ("eos" if case["params"]["eos_token_id"] is not None else "length")
    if case["nfe"] is not None:
        assert out.nfe == case["nfe"], case["id"]
    if case.get("commits_per_step") is not None:
        assert out.commits_per_step == case["commits_per_step"], case["id"]


@pytest.mark.parametrize("pad", [False, True])
def test_golden_cases_amid_traffic_arriving_mid_flight(golden_model, pad):
    """All 18 cases through a 3-slot pool: half queued at the start, the rest added while the
    first ones run, so requests wait, are admitted as others finish, and share every forward
    with requests of other modes at other blocks and steps. With ``pad`` the fixed-shape steps
    run at bucketed batch sizes (rows past the real ones on the spare slot), as CUDA graphs do."""
    engine = Engine(golden_model, max_slots=3, context=256, pad_batches=pad)
    first, rest = CASES[::2], CASES[1::2]
    ids = {c["id"]: engine.add_request(c["input_ids"], c["mode"], **c["params"]) for c in first}
    for _ in range(5):
        engine.step()
        assert engine.num_running <= 3
    assert engine.num_waiting > 0, "the pool should be full and requests waiting"
    for c in rest:
        ids[c["id"]] = engine.add_request(c["input_ids"], c["mode"], **c["params"])
        engine.step()
    while engine.has_unfinished():
        engine.step()
        assert engine.num_running <= 3
    for c in CASES:
        check_golden(engine.pop(ids[c["id"]]), c)
    assert engine.pool.free == 3


@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_prefill_gives_the_golden_outputs(golden_model, chunk):
    """Prompts of up to 150 tokens prefilled `chunk` tokens per step across all requests."""
    engine = Engine(golden_model, max_slots=4, context=256, prefill_chunk=chunk)
    cases = [c for c in CASES if len(c["input_ids"]) > 10][:4]
    outs = engine.generate([c["input_ids"] for c in cases[:1]], cases[0]["mode"],
                           **cases[0]["params"])  # fmt: skip
    check_golden(outs[0], cases[0])
    ids = [engine.add_request(c["input_ids"], c["mode"], **c["params"]) for c in cases]
    engine.run()
    for c, rid in zip(cases, ids):
        check_golden(engine.pop(rid), c)


MIXED = [
    ("ar", dict(max_new_tokens=9, temperature=0.8, top_k=20, seed=1)),
    ("ar", dict(max_new_tokens=5, temperature=0.0)),
    ("mock_ar", dict(max_new_tokens=7, temperature=1.1, top_p=0.9, seed=2)),
    ("mask_diffusion", dict(max_new_tokens=16, block_size=8, temperature=0.7, seed=3)),
    (
        "mask_diffusion",
        dict(
            max_new_tokens=24,
            block_size=4,
            steps_per_block=3,
            seed=4,
            confidence_threshold=0.5,
            temperature=0.0,
        ),
    ),  # fmt: skip
    ("ar", dict(max_new_tokens=6, temperature=1.0, top_p=0.5, seed=5, eos_token_id=[17, 99])),
]


def test_each_request_is_as_alone(builtin_model):
    """Modes, parameters and seeds mixed in one pool, arriving at different steps: each request's
    tokens, nfe and commits are those it gets alone in an engine of its own."""
    prompts = [[5, 9, 33, 70, 2], [7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46], [300], [8, 9]]
    engine = Engine(builtin_model, max_slots=4, context=64)
    ids = []
    for (mode, params), prompt in zip(MIXED, prompts):
        ids.append(engine.add_request(prompt, mode, **params))
        engine.step()
    engine.run()
    for rid, (mode, params), prompt in zip(ids, MIXED, prompts):
        out = engine.pop(rid)
        alone = Engine(builtin_model, max_slots=1, context=64).generate([prompt], mode, **params)[0]
        assert out.generated == alone.generated, (mode, params)
        assert (out.nfe, out.commits_per_step, out.finish_reason) == (
            alone.nfe, alone.commits_per_step, alone.finish_reason)  # fmt: skip
        assert len(out.generated) == params["max_new_tokens"] or out.finish_reason == "eos"


def test_engine_matches_generate(builtin_model):
    """The batch API and the engine give the same tokens for sampled runs with per-row seeds."""
    prompts = [[5, 9, 33], [7, 8], [100, 101, 102, 103]]
    params = dict(max_new_tokens=16, block_size=8, temperature=0.9, seed=[3, 4, 5])
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        want = builtin_model.generate(prompts, mode=mode, **params)
        got = Engine(builtin_model, max_slots=2, context=64).generate(prompts, mode, **params)
        assert [o.generated for o in got] == want.generated
        assert [o.nfe for o in got] == want.nfe


def test_streaming_and_step_reports(builtin_model):
    engine = Engine(builtin_model, max_slots=2, context=64)
    rid = engine.add_request([5, 6, 7], "mask_diffusion", max_new_tokens=12, block_size=4)
    other = engine.add_request([9], "ar", max_new_tokens=3)
    chunks = list(engine.stream(rid))
    assert [len(c) for c in chunks] == [4, 4, 4]  # one block at a time
    final = engine.pop(rid)
    assert sum(chunks, []) == final.generated and final.finished
    engine.run()
    reports = Engine(builtin_model, max_slots=1, context=64)
    ar = reports.add_request([9], "ar", max_new_tokens=3)
    seen = []
    while reports.has_unfinished():
        for out in reports.step():
            assert out.request_id == ar
            seen += out.new_tokens
    assert seen == reports.pop(ar).generated == engine.pop(other).generated


def test_abort_frees_the_slot_and_the_waiting_run(builtin_model):
    engine = Engine(builtin_model, max_slots=1, context=64)
    a = engine.add_request([5, 6], "ar", max_new_tokens=20)
    b = engine.add_request([7], "ar", max_new_tokens=2)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort(a)
    out = engine.pop(a)
    assert out.finish_reason == "aborted" and out.finished and len(out.generated) <= 1
    engine.run()
    assert engine.pop(b).finish_reason == "length"


def test_refusals(builtin_model):
    engine = Engine(builtin_model, max_slots=1, context=32)
    with pytest.raises(ValueError, match="exceeds the engine's context of 32"):
        engine.add_request(list(range(1, 20)), "ar", max_new_tokens=14)
    with pytest.raises(ValueError, match="multiple of block_size"):
        engine.add_request([5], "mask_diffusion", max_new_tokens=10, block_size=4)
    with pytest.raises(ValueError, match="not a token id"):
        engine.add_request([5, 10**6], "ar")
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("hello", "ar")
    with pytest.raises(ValueError, match="one integer"):
        engine.add_request([5], "ar", max_new_tokens=2, seed=[1, 2])
    engine.add_request([5], "ar", max_new_tokens=2, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([6], "ar", max_new_tokens=2, request_id="x")
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(builtin_model, max_slots=1, context=32, prefill_chunk=0)
    done = engine.add_request([5], "ar", max_new_tokens=0)
    assert engine.pop(done).finish_reason == "length"


def test_text_prompts_with_a_tokenizer(default_model):
    engine = Engine(default_model, max_slots=2, context=128)
    rid = engine.add_request("Once upon a time", "mask_diffusion", max_new_tokens=16)
    engine.run()
    out = engine.pop(rid)
    assert out.prompt == default_model.encode("Once upon a time") and len(out.generated) == 16


def test_pool_plan(golden_model):
    cfg, dtype, cpu = golden_model.config, torch.float32, torch.device("cpu")
    per_slot = slot_bytes(cfg, 100, dtype)
    # What the plan counts is what a pool allocates (lengths: one int64 per slot).
    pool = SlotPool(cfg, plan_pool(cfg, dtype, cpu, max_slots=3, context=100), dtype, cpu)
    tensors = [pool.cache.lengths, *pool.cache.keys.values(), *pool.cache.values.values()]
    for states in (pool.cache.mamba, pool.before):
        tensors += [t for s in states.values() for t in (s.conv, s.ssm)]
    assert sum(t.numel() * t.element_size() for t in tensors) == (3 + 1) * per_slot  # + spare
    plan = plan_pool(cfg, dtype, cpu, context=100, memory_budget=6 * per_slot + per_slot // 2)
    assert (plan.slots, plan.context, plan.pool_bytes) == (5, 100, 6 * per_slot)
    assert "5 sequences x 100 tokens" in plan.describe()
    assert plan_pool(cfg, dtype, cpu).slots == 8  # the CPU default
    with pytest.raises(ValueError, match="not one sequence"):
        plan_pool(cfg, dtype, cpu, context=100, memory_budget=2 * per_slot - 1)
    with pytest.raises(ValueError, match="holds 2"):
        plan_pool(cfg, dtype, cpu, context=100, max_slots=3, memory_budget=3 * per_slot)
    for bad in (dict(context=1), dict(max_slots=0), dict(gpu_memory_utilization=1.5)):
        with pytest.raises(ValueError):
            plan_pool(cfg, dtype, cpu, **bad)


def test_graphs_need_a_cuda_model(builtin_model):
    with pytest.raises(ValueError, match="CUDA"):
        Engine(builtin_model, max_slots=1, context=32, graphs=True)


def test_buckets():
    from twotower_rt.engine.steps import BUCKETS, bucket

    assert [bucket(n) for n in (1, 2, 3, 5, 17, 64, 65, 1024, 1500)] == [
        1, 2, 4, 8, 24, 64, 96, 1024, 1500]  # fmt: skip
    assert list(BUCKETS) == sorted(set(BUCKETS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_steps_match_eager():
    """The builtin model on the GPU (bf16, grouped MoE so nothing syncs with the host): every
    mode, mixed, arriving mid-flight, with the steps as CUDA graphs and eagerly."""
    from twotower_rt.api import load_builtin_model
    from twotower_rt.model.moe import MoE

    model = load_builtin_model(device="cuda", dtype="bfloat16")
    for m in model.lm.modules():
        if isinstance(m, MoE):
            m.grouped = True
    prompts = [[5, 9, 33, 70, 2], [7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46], [300], [8, 9]]
    runs = []
    for graphs in (False, True):
        engine = Engine(model, max_slots=4, context=64, graphs=graphs)
        ids = []
        for (mode, params), prompt in zip(MIXED, prompts):
            ids.append(engine.add_request(prompt, mode, **params))
            engine.step()
        engine.run()
        runs.append([engine.pop(i).generated for i in ids])
    assert runs[0] == runs[1]


def test_a_step_launches_before_it_reads_the_previous_one(builtin_model, monkeypatch):
    """The order that keeps a GPU busy: each step queues its work first, then reads back what the
    step before computed (so the host never waits between a block's steps). A GPU engine's
    order, forced here on the CPU."""
    engine = Engine(builtin_model, max_slots=2, context=64)
    engine._read_late = True
    events = []
    run, process = engine.runner.run, engine._process
    monkeypatch.setattr(engine.runner, "run", lambda *a: events.append("run") or run(*a))
    monkeypatch.setattr(engine, "_process", lambda f: events.append("read") or process(f))
    engine.add_request([5, 6, 7], "mask_diffusion", max_new_tokens=8, block_size=4)
    engine.add_request([9], "ar", max_new_tokens=3)
    steps = []
    while engine.has_unfinished():
        events.clear()
        engine.step()
        steps.append(list(events))
    for events in steps:
        if "read" in events and "run" in events:
            assert events.index("run") < events.index("read"), steps
    assert steps[-1] == ["read"]  # the last step only drains what the one before launched


def test_on_the_cpu_a_step_reads_its_own_outputs(builtin_model, monkeypatch):
    """On the CPU a step is done when launched, so it is read at once: no denoiser forward runs
    on a block that is already complete (each launched denoise row is one counted forward),
    and the outputs are the read-late order's, token for token."""
    prompts = [[5, 6, 7], [9, 10], [11]]
    params = dict(max_new_tokens=16, block_size=4, confidence_threshold=0.5)
    outputs = {}
    for late in (False, True):
        engine = Engine(builtin_model, max_slots=3, context=64)
        assert engine._read_late is False  # the CPU's default
        engine._read_late = late
        rows = []
        run = engine.runner.run

        def counted(key, inputs, run=run, rows=rows):
            if key.kind == "denoise":
                rows.append(inputs["slots"].numel())
            return run(key, inputs)

        monkeypatch.setattr(engine.runner, "run", counted)
        ids = [engine.add_request(p, "mask_diffusion", seed=i, **params)
               for i, p in enumerate(prompts)]  # fmt: skip
        engine.run()
        results = [engine.pop(i) for i in ids]
        outputs[late] = [r.generated for r in results]
        if not late:
            assert sum(rows) == sum(r.nfe for r in results)
        else:  # read late: one wasted row per block at least
            assert sum(rows) >= sum(r.nfe for r in results) + 16 // 4
    assert outputs[False] == outputs[True]


def _set_states_in_place(model, on: bool) -> None:
    from twotower_rt.model.mamba import Mamba2Mixer

    for m in model.lm.modules():
        if isinstance(m, Mamba2Mixer):
            m.states_in_place = on


def test_mamba_states_in_place_give_the_golden_outputs(golden_model):
    """Mamba2Mixer.states_in_place: the pool's SSM rows read and written where they are (here the
    PyTorch path of ssm_scan(state_rows=)); the golden cases through the engine are unchanged."""
    _set_states_in_place(golden_model, True)
    try:
        engine = Engine(golden_model, max_slots=3, context=256)
        ids = {c["id"]: engine.add_request(c["input_ids"], c["mode"], **c["params"]) for c in CASES}
        engine.run()
        for c in CASES:
            check_golden(engine.pop(ids[c["id"]]), c)
    finally:
        _set_states_in_place(golden_model, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mamba_states_in_place_on_gpu_match_gathered():
    """The scan kernel reading and writing the slot pool's rows in place (states_in_place) gives
    the tokens of the gathered path, every mode, bf16."""
    from twotower_rt.api import load_builtin_model

    model = load_builtin_model(device="cuda", dtype="bfloat16")
    prompts = [[5, 9, 33, 70, 2], [7], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46], [300], [8, 9]]
    runs = []
    for in_place in (False, True):
        _set_states_in_place(model, in_place)
        engine = Engine(model, max_slots=4, context=64)
        ids = [engine.add_request(p, mode, **params) for (mode, params), p in zip(MIXED, prompts)]
        engine.run()
        runs.append([engine.pop(i).generated for i in ids])
    assert runs[0] == runs[1]
