"""Batch invariance (workers/invariant.py): a token's numbers do not depend on what shares its
engine steps. First the kernels, on random tensors (these fail if a torch upgrade changes how
they sum); then the engine on the built-in model in bf16, where without invariance 7 of 24
greedy texts, and all 24 answers' logprobs, change when the requests are sent together
(docs/decisions.md, bench/determinism.py)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import prompt_ids
from workers import invariant
from workers.engine import SamplingParams, run_to_end

DTYPES = [torch.bfloat16, torch.float32]
HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M's attention


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_linear_row_is_the_same_whatever_rows_share_the_call(dtype) -> None:
    torch.manual_seed(0)
    for inputs, outputs in [(576, 1536), (1536, 576), (576, 576)]:
        layer = torch.nn.Linear(inputs, outputs, bias=False).to(dtype)
        x = torch.randn(300, inputs, dtype=dtype)
        alone = torch.cat([invariant.linear(layer, x[i : i + 1]) for i in range(len(x))])
        for rows in [2, 17, 32, 33, 64, 100, 300]:
            assert torch.equal(invariant.linear(layer, x[:rows]), alone[:rows]), (inputs, outputs, rows)
        assert torch.equal(invariant.linear(layer, x[:40].view(4, 10, inputs)).view(40, -1), alone[:40])


def random_requests(lengths: list[int], dtype) -> tuple[list[torch.Tensor], ...]:
    q = [torch.randn(HEADS, n, DIM, dtype=dtype) for n in lengths]
    k = [torch.randn(KV_HEADS, n, DIM, dtype=dtype) for n in lengths]
    v = [torch.randn(KV_HEADS, n, DIM, dtype=dtype) for n in lengths]
    return q, k, v


@pytest.fixture(params=["products", "elementwise"])
def core(request, monkeypatch):
    """Each attention core, as if the start-up check had picked it on this machine."""
    chosen = getattr(invariant, f"_{request.param}")
    monkeypatch.setitem(invariant._cores, ("cpu", torch.get_num_threads()), chosen)
    return chosen


def test_this_cpu_gets_the_product_core_and_the_check_refuses_a_core_that_varies() -> None:
    """The start-up check passes the blocked products here (the fast core: bench/determinism.py),
    and fails torch's own SDPA (its blocks follow the lengths it is given)."""
    assert invariant.attention_core(torch.device("cpu")) is invariant._products

    def sdpa(query, key, value, hidden, scale):
        hidden = hidden.transpose(-3, -2).flatten(-2).transpose(-3, -2)  # [..., 1, Q, keys]
        keys, values = key.unsqueeze(-3), value.unsqueeze(-3)
        out = F.scaled_dot_product_attention(
            query.transpose(-3, -2), keys, values, attn_mask=~hidden, scale=scale
        )
        return out.transpose(-3, -2)

    assert not invariant._invariant(sdpa, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_positions_attention_is_the_same_decoded_alone_in_a_batch_or_in_a_prompt_chunk(dtype, core) -> None:
    """Request b's last position: decoded beside other requests (padded to the longest), decoded
    alone, and read as part of its prompt in chunks of several sizes, all bit for bit equal, by
    either core."""
    draw = random.Random(1)
    torch.manual_seed(1)
    scale = DIM**-0.5
    for _ in range(20):
        lengths = [draw.randint(1, 300) for _ in range(draw.randint(1, 16))]
        q, k, v = random_requests(lengths, dtype)
        keys, values = torch.cat(k, dim=1), torch.cat(v, dim=1)
        ends = list(itertools.accumulate(lengths))
        starts = [end - n for end, n in zip(ends, lengths, strict=True)]
        last = torch.stack([x[:, -1] for x in q], dim=1)
        batched = invariant.decode_attention(last, keys, values, starts, ends, scale)
        for b, n in enumerate(lengths):
            alone = invariant.decode_attention(last[:, b : b + 1], k[b], v[b], [0], [n], scale)
            assert torch.equal(batched[b], alone[0])
            for chunk in {n, 16, 5, 1}:
                past = (n - 1) // chunk * chunk
                read = invariant.attention(q[b][:, past:], k[b], v[b], past, scale)
                assert torch.equal(read[-1], batched[b]), (n, chunk)


def test_the_invariant_attention_computes_causal_attention(core) -> None:
    """Against SDPA on one prompt read in two chunks and two decoding requests, in fp32, by
    either core."""
    torch.manual_seed(2)
    scale = DIM**-0.5
    q, k, v = random_requests([40, 7, 12], torch.float32)

    def expected(b: int, rows: slice) -> torch.Tensor:
        keys, values = (x[b].repeat_interleave(HEADS // KV_HEADS, 0) for x in (k, v))
        full = F.scaled_dot_product_attention(q[b], keys, values, is_causal=True, scale=scale)
        return full.transpose(0, 1)[rows]

    # Step 1: the first 30 prompt tokens of request 0; step 2: the last 10, beside 2 decodes.
    first = invariant.attention(q[0][:, :30], k[0][:, :30], v[0][:, :30], 0, scale)
    assert torch.allclose(first, expected(0, slice(0, 30)), atol=1e-5)
    cu_q = torch.tensor([0, 10, 11, 12])
    cu_k = torch.tensor([0, 40, 47, 59])
    query = torch.cat([q[0][:, 30:], q[1][:, -1:], q[2][:, -1:]], dim=1)[None]
    out, _ = invariant.paged_attention(
        None,  # type: ignore[arg-type]
        query,
        torch.cat(k, dim=1)[None],
        torch.cat(v, dim=1)[None],
        None,
        fallback=None,
        scaling=scale,
        cu_seq_lens_q=cu_q,
        cu_seq_lens_k=cu_k,
    )
    assert torch.allclose(out[0, :10], expected(0, slice(30, 40)), atol=1e-5)
    assert torch.allclose(out[0, 10], expected(1, slice(6, 7))[0], atol=1e-5)
    assert torch.allclose(out[0, 11], expected(2, slice(11, 12))[0], atol=1e-5)


# ---------------------------------------------------------------- the engine, on the model

# The engine tests share one engine, whose outbox is bound to the event loop it first waits on.
ENGINE_LOOP = pytest.mark.asyncio(loop_scope="module")
TOPICS = ["hash tables", "the moon", "binary search", "rivers", "jazz", "volcanoes", "bread", "owls"]


@pytest.fixture(scope="module")
def bf16_engine(model_path):
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="bfloat16", threads=1)
    engine = TransformersEngine(loaded, max_batch=16, kv_cache_tokens=8192, batch_invariant=True)
    engine.start()
    yield engine
    engine.stop()


async def run(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    """Each prompt's (token ids, logprobs), all added to the engine at once."""
    return await run_to_end(engine, prompts, params)


def chats(tokenizer) -> list[list[int]]:
    return [prompt_ids(tokenizer, f"Explain {topic} in two sentences.") for topic in TOPICS]


@ENGINE_LOOP
async def test_bf16_greedy_answers_sent_together_equal_each_sent_alone(bf16_engine, tokenizer) -> None:
    prompts = chats(tokenizer)
    greedy = [SamplingParams(temperature=0, max_new_tokens=24, logprobs=0)] * len(prompts)
    together = await run(bf16_engine, prompts, greedy)
    alone = [(await run(bf16_engine, [p], greedy[:1]))[0] for p in prompts]
    assert together == alone
    assert len({tuple(tokens) for tokens, _ in together}) == len(prompts)  # not one answer for all


@ENGINE_LOOP
async def test_bf16_seeded_draws_do_not_depend_on_what_shares_their_steps(bf16_engine, tokenizer) -> None:
    prompts = chats(tokenizer)
    seeded = [SamplingParams(temperature=0.8, seed=7 + i, max_new_tokens=24) for i in range(len(prompts))]
    together = await run(bf16_engine, prompts, seeded)
    alone = [(await run(bf16_engine, [p], [s]))[0] for p, s in zip(prompts, seeded, strict=True)]
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]


async def five_answers_to_a_long_prompt(engine, tokenizer) -> list[tuple]:
    """Past one KV page (256 tokens), so from the second time on its prefix is shared."""
    text = " ".join(f"Here is a note about {topic}." for topic in TOPICS * 6) + " Summarise the notes."
    prompt = prompt_ids(tokenizer, text)
    assert len(prompt) > 300
    greedy = [SamplingParams(temperature=0, max_new_tokens=16, logprobs=0)]
    return [(await run(engine, [prompt], greedy))[0] for _ in range(5)]


@ENGINE_LOOP
async def test_bf16_a_long_prompt_sent_five_times_gives_five_equal_answers_and_logprobs(
    bf16_engine, tokenizer
) -> None:
    answers = await five_answers_to_a_long_prompt(bf16_engine, tokenizer)
    assert all(answer == answers[0] for answer in answers)


@pytest.mark.slow  # loads a model
async def test_fp32_a_long_prompt_sent_five_times_gives_five_equal_answers_and_logprobs(
    model_path, tokenizer
) -> None:
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="float32", threads=1)
    engine = TransformersEngine(loaded, max_batch=16, kv_cache_tokens=8192, batch_invariant=True)
    engine.start()
    try:
        answers = await five_answers_to_a_long_prompt(engine, tokenizer)
    finally:
        engine.stop()
    assert all(answer == answers[0] for answer in answers)


@ENGINE_LOOP
async def test_bf16_a_takeover_continues_with_the_uninterrupted_tokens(bf16_engine, tokenizer) -> None:
    """What a worker that takes over does: the prompt and the tokens produced so far, read in
    as one prompt, then decoded on; beside other requests, in bf16."""
    prompts = chats(tokenizer)
    greedy = SamplingParams(temperature=0, max_new_tokens=30)
    whole = await run(bf16_engine, prompts[:4], [greedy] * 4)
    done = 11
    resumed = [p + tokens[:done] for p, (tokens, _) in zip(prompts, whole, strict=False)]
    rest = SamplingParams(temperature=0, max_new_tokens=30 - done, resumed_tokens=done)
    continued = await run(bf16_engine, resumed + prompts[4:], [rest] * 4 + [greedy] * 4)
    assert [tokens[done:] for tokens, _ in whole] == [tokens for tokens, _ in continued[:4]]


async def test_bf16_lora_answers_sent_together_equal_each_sent_alone(model_path, adapters, tokenizer) -> None:
    """Requests for the base and two adapters share steps; each adapter's delta is a product
    over its own requests' rows, which must not change with how many there are."""
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="bfloat16", threads=1)
    engine = TransformersEngine(
        loaded, max_batch=16, kv_cache_tokens=8192, adapters=adapters, batch_invariant=True
    )
    engine.start()
    try:
        jobs = [(adapter, prompt) for adapter in ("", "tuned", "other") for prompt in chats(tokenizer)[:4]]
        params = [SamplingParams(temperature=0, max_new_tokens=16, logprobs=0, adapter=a) for a, _ in jobs]
        together = await run(engine, [prompt for _, prompt in jobs], params)
        alone = [(await run(engine, [prompt], [p]))[0] for (_, prompt), p in zip(jobs, params, strict=True)]
    finally:
        engine.stop()
    assert engine.lora is not None and engine.lora.mixed_steps > 0
    assert together == alone


@ENGINE_LOOP
async def test_bf16_the_one_at_a_time_engine_gives_the_batch_engines_tokens_and_takes_over_exactly(
    bf16_engine, model_path, tokenizer
) -> None:
    """The decode loop that serves what continuous batching cannot, with invariance in bf16:
    each answer equals the continuous batch's (tokens and logprobs), and a takeover (prompt and
    the tokens so far read in as one prompt) continues with the uninterrupted tokens."""
    from workers.generate_engine import GenerateEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="bfloat16", threads=1)
    engine = GenerateEngine(loaded, "a test", batch_invariant=True)
    engine.start()
    try:
        prompts = chats(tokenizer)[:3]
        greedy = SamplingParams(temperature=0, max_new_tokens=30, logprobs=0)
        alone = [(await run(engine, [p], [greedy]))[0] for p in prompts]
        done = 11
        rest = SamplingParams(temperature=0, max_new_tokens=30 - done, resumed_tokens=done, logprobs=0)
        continued = [
            (await run(engine, [p + tokens[:done]], [rest]))[0]
            for p, (tokens, _) in zip(prompts, alone, strict=True)
        ]
    finally:
        engine.stop()
    assert alone == await run(bf16_engine, prompts, [greedy] * 3)
    assert [(tokens[done:], logprobs[done:]) for tokens, logprobs in alone] == continued


@pytest.mark.slow  # loads a model
async def test_bf16_the_one_at_a_time_engine_breaks_a_greedy_tie_as_the_batch_engine_does(
    model_path, tokenizer
) -> None:
    """In bf16 the first logits for "Explain hash tables" tie (two tokens at 33.5). Greedy must
    pick the lowest id every time, as argmax and a continuous batch do; a top-k threshold kept
    both, and the draw after it chose between them at random."""
    from workers.generate_engine import GenerateEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="bfloat16", threads=1)
    prompt = chats(tokenizer)[0]
    with torch.no_grad():
        first = loaded.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    tied = (first == first.max()).nonzero().flatten().tolist()
    assert len(tied) > 1  # the case this test is about
    engine = GenerateEngine(loaded, "a test")
    engine.start()
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=1)
        firsts = [(await run(engine, [prompt], [greedy]))[0][0][0] for _ in range(8)]
    finally:
        engine.stop()
    assert firsts == [min(tied)] * 8
