"""Per-request sampling through the API: seed, logprobs, penalties and min_p."""

from __future__ import annotations

from collections import Counter

import openai
import torch

from tests.conftest import MODEL, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def api(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(stack: Stack, **fields) -> openai.types.chat.ChatCompletion:
    fields = {"model": MODEL, "messages": QUESTION, "max_tokens": 20, **fields}
    return api(stack).chat.completions.create(**fields)


def test_the_same_seed_gives_the_same_sampled_text_and_another_seed_another(stack: Stack) -> None:
    first = chat(stack, temperature=1.2, seed=1234, n=2)
    again = chat(stack, temperature=1.2, seed=1234, n=2)
    other = chat(stack, temperature=1.2, seed=99)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]  # each choice draws its own tokens
    assert other.choices[0].message.content not in texts


def test_chat_logprobs_are_the_models_raw_log_probabilities(stack: Stack, model_path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    reply = chat(stack, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in entries)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    values, ids = torch.topk(first, 3)
    assert [t.token for t in entries[0].top_logprobs] == [tokenizer.decode([i]) for i in ids.tolist()]
    assert [t.logprob for t in entries[0].top_logprobs] == pytest_approx(values.tolist())


def pytest_approx(values):
    import pytest

    return pytest.approx(values, abs=1e-3)


def test_streamed_logprobs_equal_the_unstreamed_ones(stack: Stack) -> None:
    plain = chat(stack, temperature=0, max_tokens=8, logprobs=True)
    streamed = []
    for chunk in chat(stack, temperature=0, max_tokens=8, logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in plain.choices[0].logprobs.content
    ]


def test_completions_logprobs_use_the_legacy_shape(stack: Stack) -> None:
    reply = api(stack).completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(alternatives) == 2 for alternatives in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def most_repeated(text: str, tokenizer) -> int:
    """How often the most frequent token occurs in the text."""
    return Counter(tokenizer.encode(text)).most_common(1)[0][1]


def complete(stack: Stack, **fields) -> str:
    fields = {"model": MODEL, "prompt": "cat " * 12, "temperature": 0, "max_tokens": 24, **fields}
    return api(stack).completions.create(**fields).choices[0].text


def test_frequency_and_repetition_penalties_reduce_repetition(stack: Stack, tokenizer) -> None:
    plain = most_repeated(complete(stack), tokenizer)
    assert plain >= 10  # without a penalty the model repeats itself
    assert most_repeated(complete(stack, frequency_penalty=2.0), tokenizer) < plain
    assert most_repeated(complete(stack, extra_body={"repetition_penalty": 1.8}), tokenizer) < plain


def test_presence_penalty_changes_greedy_output(stack: Stack) -> None:
    assert complete(stack, presence_penalty=2.0) != complete(stack)


def test_min_p_of_one_keeps_only_the_most_likely_token(stack: Stack) -> None:
    greedy = chat(stack, temperature=0).choices[0].message.content
    hot = chat(stack, temperature=1.5, n=3, extra_body={"min_p": 1.0})
    assert {c.message.content for c in hot.choices} == {greedy}


def test_the_faster_top_k_and_top_p_keep_exactly_what_transformers_keeps() -> None:
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopKLogitsWarper,
        ContinuousBatchingTopPLogitsWarper,
    )

    from workers.sampling import TopK, TopP

    vocab = 500
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, vocab, generator=generator)
    scores[2, :3] = 4.0  # ties at the threshold
    ks = torch.tensor([1, 5, 3, vocab, 50, 2], dtype=torch.int32)
    ps = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.95, 0.2]).view(torch.int32)
    reference_k = ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(top_k=50))
    reference_p = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(top_p=0.9))
    fast_k, fast_p = TopK(TopKLogitsWarper(top_k=50)), TopP(TopPLogitsWarper(top_p=0.9))

    assert torch.equal(fast_k(scores.clone(), ks), reference_k(scores.clone(), ks))
    assert torch.equal(fast_p(scores.clone(), ps), reference_p(scores.clone(), ps))
    # A greedy row keeps one token, the lowest id among equal scores (as argmax and `generate`):
    # a threshold would keep row 2's three tied tokens, and the draw would pick one at random.
    greedy = torch.ones(6, dtype=torch.int32)
    kept = fast_k(scores.clone(), greedy) > float("-inf")
    assert kept.sum(dim=-1).tolist() == [1] * 6
    assert kept.nonzero()[:, 1].tolist() == scores.argmax(dim=-1).tolist() and bool(kept[2, 0])


def test_the_inverse_cdf_draw_follows_the_distribution_and_keeps_a_lone_token() -> None:
    from types import SimpleNamespace

    import torch

    from workers.sampling import _sample_by_inverse_cdf

    torch.manual_seed(0)
    rows, vocab = 20_000, 6
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5])
    scores = logits.repeat(rows, 1)
    scores[-1] = float("-inf")
    scores[-1, 3] = 0.0  # a row that processors narrowed to one token
    output = torch.zeros(2, rows, dtype=torch.int32)

    _sample_by_inverse_cdf(SimpleNamespace(return_logprobs=True), scores.unsqueeze(0), output)

    drawn = output[0, :-1].long()
    frequencies = torch.bincount(drawn, minlength=vocab).float() / (rows - 1)
    expected = torch.softmax(logits, dim=-1)
    # Within 4 standard errors of each probability; a zero-probability token is never drawn.
    tolerance = 4 * (expected * (1 - expected) / rows).sqrt() + 1e-9
    assert ((frequencies - expected).abs() <= tolerance).all(), (frequencies, expected)
    assert frequencies[4] == 0
    assert output[0, -1] == 3
    logprobs = output[1].view(torch.float32)
    assert torch.allclose(logprobs[:-1], torch.log(expected)[drawn], atol=1e-5)
    assert logprobs[-1] == 0.0
