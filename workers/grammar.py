"""Constrained decoding for `response_format`: JSON schemas compiled, for one model's
tokenizer, into matchers that say which tokens may come next (llguidance). The schema's grammar
and layout are the contract's (broker/structured.py); workers/sampling.py's `GrammarMask`
applies the matchers to the logits."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from broker.structured import SchemaError, grammar_of

# Schemas whose compiled matcher is kept (the least recently used goes first).
_CACHED = 256


class Grammars:
    """Matchers for one model's tokenizer. The first request with a schema pays for its
    compilation; later ones copy the compiled matcher."""

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

    def matcher(self, schema_text: str) -> Any:
        """A fresh matcher at the start of output for this schema."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(schema_text)
            if compiled is not None:
                self._compiled.move_to_end(schema_text)
                return compiled.deep_copy()
        compiled = LLMatcher(self._llg_tokenizer(), grammar_of(schema_text))
        if compiled.is_error():
            raise SchemaError(compiled.get_error())
        with self._lock:
            self._compiled[schema_text] = compiled
            if len(self._compiled) > _CACHED:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()
