"""Same requests, same tokens: overlap vs not, radix cache vs not, retraction vs not."""

from __future__ import annotations

from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.schema import BatchDone, ReqFinished, ReqFirstToken

from .engine_helpers import RecordingEmitter, prompts, tiny_engine

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, ignore_eos=True)


def common_prefix_len(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def workload(engine) -> dict[str, list[int]]:
    """Mixed greedy/sampled requests arriving while others decode; output tokens by rid."""
    outputs: dict[str, list[int]] = {}
    rids = []
    for wave in range(3):
        for i, p in enumerate(prompts(4, 30 + 40 * wave, shared="system: be brief. ")):
            sp = SAMPLED if i % 2 else GREEDY
            rids.append(engine.submit(p, sp, rid=f"w{wave}-{i}"))
        for _ in range(3):
            engine.step()
    engine.run_until_idle()
    for rid in rids:
        result = engine.pop_result(rid)
        assert result is not None and result.completion_tokens == 12
        outputs[rid] = result.output_ids
    return outputs


def test_overlap_and_normal_give_identical_tokens() -> None:
    kw = dict(page_size=4, chunked_prefill_size=48)
    normal = workload(tiny_engine(enable_overlap=False, **kw))
    overlap = workload(tiny_engine(enable_overlap=True, **kw))
    assert normal == overlap


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    alone = tiny_engine().generate(["tell me a story"], SAMPLED)[0].output_ids
    crowd = tiny_engine().generate([*prompts(5), "tell me a story"], SAMPLED)[-1].output_ids
    assert alone != tiny_engine().generate(["tell me a story"], GREEDY)[0].output_ids
    # Same engine seed and submission index → same generator; batch mates do not matter.
    seeded = SamplingParams(max_new_tokens=12, temperature=0.8, seed=42, ignore_eos=True)
    a = tiny_engine().generate(["tell me a story"], seeded)[0].output_ids
    b = tiny_engine().generate([*prompts(5), "tell me a story"], seeded)[-1].output_ids
    assert a == b and len(alone) == len(crowd) == 12


def test_shared_prefix_is_served_from_the_radix_cache() -> None:
    shared = "You are a helpful assistant. Answer in one line. " * 2  # 100 bytes
    first, second = shared + "What is KV?", shared + "What is a radix tree?"
    em = RecordingEmitter()
    cached_engine = tiny_engine(em, page_size=4)
    a = cached_engine.generate([first], GREEDY)[0]
    b = cached_engine.generate([second], GREEDY)[0]
    assert a.cached_tokens == 0
    common = common_prefix_len(first, second)  # "...What is " is shared too
    assert b.cached_tokens == common // 4 * 4 >= 96
    # Reported in the request and batch events, too.
    assert em.of(ReqFirstToken)[-1].cached_tokens == b.cached_tokens
    assert em.of(ReqFinished)[-1].cached_tokens == b.cached_tokens
    prefill = [d.prefill for d in em.of(BatchDone) if d.prefill]
    assert prefill[-1].cached_tokens == b.cached_tokens
    assert prefill[-1].new_tokens == len(second) - b.cached_tokens
    # Same tokens as an engine that computes the whole prompt.
    plain = tiny_engine(enable_radix_cache=False, page_size=4)
    assert plain.generate([second], GREEDY)[0].output_ids == b.output_ids


def test_concurrent_requests_share_a_prefix_while_running() -> None:
    engine = tiny_engine(page_size=4)
    shared = "common system prompt, forty-eight bytes long..."
    engine.submit(shared + " first", GREEDY, rid="a")
    engine.step()  # a's prefill puts its pages in the cache while a keeps running
    engine.submit(shared + " second", GREEDY, rid="b")
    engine.run_until_idle()
    common = common_prefix_len(shared + " first", shared + " second")
    assert engine.pop_result("b").cached_tokens == common // 4 * 4
