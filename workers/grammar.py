"""Constrained decoding: grammars (a `response_format`'s JSON schema, a forced tool call)
compiled, for one model's tokenizer, into matchers that say which tokens may come next
(llguidance). A schema's grammar and layout are the contract's (broker/structured.py), a tool
call's the worker's (workers/tools.py); workers/sampling.py's `GrammarMask` applies the matchers
to the logits."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from broker.structured import SchemaError

# Grammars whose compiled matcher is kept (the least recently used goes first).
_CACHED = 256


class Grammars:
    """Matchers for one model's tokenizer. The first request with a grammar (a schema's, a
    forced tool call's) pays for its compilation; later ones copy the compiled matcher."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            eos = self.eos or None
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos
            )
        return self._tokenizer

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the start of output for this grammar (llguidance's JSON text)."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        compiled = LLMatcher(self._llg_tokenizer(), grammar)
        if compiled.is_error():
            raise SchemaError(compiled.get_error())
        with self._lock:
            self._compiled[grammar] = compiled
            if len(self._compiled) > _CACHED:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()
