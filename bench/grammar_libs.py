"""Which grammar library Corral's constrained decoding uses, by measurement: llguidance,
xgrammar and outlines-core on the built-in model's tokenizer and the test schemas
(tests/schemas.py), on one thread.

For each library and schema: the time to compile the schema into something that can mask
(cold, then again for the same schema: what a cache of compiled grammars saves), and the time
to compute one token mask, over a walk of up to 64 tokens through valid output (at each step
the allowed token with the highest of a fixed random score, so every library walks a valid
path of its own). Also whether the library accepted the schema at all.

    pip install --no-deps llguidance xgrammar outlines-core apache-tvm-ffi
    python bench/grammar_libs.py [--json bench/results/grammar_libs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.schemas import SCHEMAS

STEPS = 64


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def mask(self, matcher) -> torch.Tensor:
        bitmask = self.lt.allocate_token_bitmask(1, self.vocab)
        self.lt.fill_next_token_bitmask(matcher, bitmask, 0)
        return bitmask

    def allowed(self, bitmask: torch.Tensor) -> torch.Tensor:
        return _unpack(bitmask, self.vocab)

    def advance(self, matcher, token: int) -> bool:
        matcher.consume_token(token)
        return not matcher.is_stopped() and not matcher.is_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher) -> torch.Tensor:
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask

    def allowed(self, bitmask: torch.Tensor) -> torch.Tensor:
        return _unpack(bitmask, self.vocab)

    def advance(self, matcher, token: int) -> bool:
        return bool(matcher.accept_token(token)) and not matcher.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.regex_of = outlines_core, build_regex_from_schema
        decoder = {v: k for k, v in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        eos = tokenizer.eos_token_id
        for text, i in tokenizer.get_vocab().items():
            if i == eos or i in tokenizer.all_special_ids:
                continue
            try:
                raw = bytes(decoder[c] for c in text)
            except KeyError:
                continue
            tokens.setdefault(raw, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)
        self.vocab = vocab

    def compile(self, schema: dict):
        return self.oc.Index(self.regex_of(json.dumps(schema)), self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def mask(self, matcher) -> list[int]:
        return matcher.get_tokens()

    def allowed(self, tokens: list[int]) -> torch.Tensor:
        allowed = torch.zeros(self.vocab, dtype=torch.bool)
        allowed[torch.tensor(tokens, dtype=torch.long)] = True
        return allowed

    def advance(self, matcher, token: int) -> bool:
        matcher.advance(token)
        return not matcher.is_finished()


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask[0].view(torch.int32).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable stand-in of every byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def measure(library, schema: dict) -> dict:
    started = time.perf_counter()
    compiled = library.compile(schema)
    cold_ms = 1000 * (time.perf_counter() - started)
    started = time.perf_counter()
    matcher = library.matcher(compiled)
    warm_ms = 1000 * (time.perf_counter() - started)
    generator = torch.Generator().manual_seed(0)
    mask_ms = []
    for _ in range(STEPS):
        started = time.perf_counter()
        mask = library.mask(matcher)
        mask_ms.append(1000 * (time.perf_counter() - started))
        allowed = library.allowed(mask)
        if not bool(allowed.any()):
            break
        scores = torch.rand(library.vocab, generator=generator).masked_fill(~allowed, -1.0)
        if not library.advance(matcher, int(scores.argmax())):
            break
    return {"compile_ms": cold_ms, "matcher_ms": warm_ms, "mask_ms": mask_ms}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from broker.settings import Settings
    from workers.loading import resolve_model_path

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.model, settings.home))
    vocab = len(tokenizer)
    results = {}
    for kind in (Llguidance, Xgrammar, OutlinesCore):
        started = time.perf_counter()
        library = kind(tokenizer, vocab)
        setup_s = time.perf_counter() - started
        rows, refused = [], {}
        for name, schema, _ in SCHEMAS:
            try:
                rows.append(measure(library, schema))
            except Exception as e:  # a schema the library cannot take
                refused[name] = f"{type(e).__name__}: {str(e)[:120]}"
        compile_ms = sorted(r["compile_ms"] for r in rows)
        masks = [m for r in rows for m in r["mask_ms"]]
        summary = {
            "tokenizer_setup_s": round(setup_s, 2),
            "schemas_accepted": len(rows),
            "schemas_refused": refused,
            "compile_ms_p50": round(statistics.median(compile_ms), 2) if rows else None,
            "compile_ms_p95": round(compile_ms[int(0.95 * (len(compile_ms) - 1))], 2) if rows else None,
            "compile_ms_max": round(compile_ms[-1], 2) if rows else None,
            "new_matcher_ms_p50": round(statistics.median(r["matcher_ms"] for r in rows), 3)
            if rows
            else None,
            "mask_us_p50": round(1000 * statistics.median(masks), 1) if masks else None,
            "mask_us_p95": round(1000 * sorted(masks)[int(0.95 * (len(masks) - 1))], 1) if masks else None,
            "masks": len(masks),
        }
        results[kind.name] = summary
        print(f"{kind.name:14} {json.dumps(summary)}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
