"""Corral's judge prompts, all in this file and versioned together: change any text, bump VERSION
(judgments record the version they were made with, so old and new are never mixed silently).

Single grading ends with `Rating: [[N]]` (N from 1 to 10); pairwise with `[[A]]`, `[[B]]` or
`[[C]]` (a tie). Reference-guided variants show a reference answer for categories with one right
answer; multi-turn variants show the whole two-turn conversation and grade the second answer.
Structured judgments (`NAME+json`) ask for the verdict as a JSON object instead, whose shape the
judge's server enforces through response_format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

VERSION = "corral-judge-v1"

_SINGLE_SYSTEM = (
    "You grade one answer of an AI assistant. Judge how well it serves the user: correctness first, "
    "then helpfulness, relevance, depth and clarity. Length is not merit: a short correct answer beats a "
    "long wrong one. Think it through in a few sentences, then end with your grade on its own line, "
    "exactly in this form: Rating: [[N]], where N is a whole number from 1 (useless or wrong) to 10 "
    "(excellent). Give exactly one rating."
)
_SINGLE_REF_SYSTEM = _SINGLE_SYSTEM + (
    " A reference answer is provided: compare the assistant's answer with it, find any mistake, and grade "
    "a wrong final answer low however well it is written."
)
_PAIR_SYSTEM = (
    "You compare the answers of two AI assistants, A and B, to the same user. Decide which one serves the "
    "user better: correctness first, then helpfulness, relevance, depth and clarity. The order in which "
    "they appear and their length must not sway you, and neither must the assistants' names. Explain "
    "briefly, then end with your verdict on its own line: [[A]] if A is better, [[B]] if B is better, "
    "[[C]] for a tie. Give exactly one verdict."
)
_PAIR_REF_SYSTEM = _PAIR_SYSTEM + (
    " A reference answer is provided: check both answers against it; an answer whose result is wrong "
    "loses to one whose result is right."
)


@dataclass(frozen=True)
class Prompt:
    name: str
    system: str
    user: str
    kind: str  # "single" or "pair"

    @property
    def versioned_name(self) -> str:
        return f"{self.name}@{VERSION}"


# The conversation as the judge sees it, per variant.
_Q1 = "[Question]\n{question_1}\n\n"
_REF1 = "[Reference answer]\n{ref_1}\n\n"
_MULTI = "[User]\n{question_1}\n\n"
_SECOND = " Grade only the assistant's second answer."
_SECOND_PAIR = " Compare only their second answers, in the light of the first."
_PAIR_1 = "[Assistant A]\n{answer_a_1}\n\n[Assistant B]\n{answer_b_1}"
_PAIR_2 = (
    "\n\n[User]\n{question_2}\n\n{ref_2_block}[Assistant A — compare this]\n{answer_a_2}\n\n"
    "[Assistant B — compare this]\n{answer_b_2}"
)
_SINGLE_2 = "\n\n[User]\n{question_2}\n\n{ref_2_block}[Assistant — grade this answer]\n{answer_2}"

PROMPTS = {
    p.name: p
    for p in [
        Prompt("single", _SINGLE_SYSTEM, _Q1 + "[Assistant's answer]\n{answer_1}", "single"),
        Prompt("single-ref", _SINGLE_REF_SYSTEM, _Q1 + _REF1 + "[Assistant's answer]\n{answer_1}", "single"),
        Prompt(
            "single-multi", _SINGLE_SYSTEM + _SECOND, _MULTI + "[Assistant]\n{answer_1}" + _SINGLE_2, "single"
        ),
        Prompt(
            "single-multi-ref",
            _SINGLE_REF_SYSTEM + _SECOND,
            _MULTI + _REF1 + "[Assistant]\n{answer_1}" + _SINGLE_2,
            "single",
        ),
        Prompt("pair", _PAIR_SYSTEM, _Q1 + _PAIR_1, "pair"),
        Prompt("pair-ref", _PAIR_REF_SYSTEM, _Q1 + _REF1 + _PAIR_1, "pair"),
        Prompt("pair-multi", _PAIR_SYSTEM + _SECOND_PAIR, _MULTI + _PAIR_1 + _PAIR_2, "pair"),
        Prompt("pair-multi-ref", _PAIR_REF_SYSTEM + _SECOND_PAIR, _MULTI + _REF1 + _PAIR_1 + _PAIR_2, "pair"),
    ]
}


# Structured verdicts (`structured` judgments): the same prompts, the verdict asked as a JSON object
# whose shape response_format enforces. The reason comes first, so the verdict follows from it.
_JSON_TAIL = {
    "single": (
        ' Instead of the Rating line, reply with only a JSON object: "reason", your reasoning in a '
        'few sentences, then "rating", the whole number from 1 to 10.'
    ),
    "pair": (
        ' Instead of the [[A]], [[B]] or [[C]] line, reply with only a JSON object: "reason", your '
        'reasoning in a few sentences, then "verdict": "A", "B" or "C" (a tie).'
    ),
}
_REASON = {"type": "string", "maxLength": 1200}
VERDICT_SCHEMAS = {
    "single": {
        "type": "object",
        "properties": {"reason": _REASON, "rating": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["reason", "rating"],
        "additionalProperties": False,
    },
    "pair": {
        "type": "object",
        "properties": {"reason": _REASON, "verdict": {"enum": ["A", "B", "C"]}},
        "required": ["reason", "verdict"],
        "additionalProperties": False,
    },
}


def structured(prompt: Prompt) -> Prompt:
    """The prompt with its verdict asked as JSON (named `NAME+json`)."""
    return replace(prompt, name=f"{prompt.name}+json", system=prompt.system + _JSON_TAIL[prompt.kind])


def response_format(kind: str) -> dict:
    """response_format that enforces a verdict's JSON."""
    return {
        "type": "json_schema",
        "json_schema": {"name": f"{kind}_verdict", "schema": VERDICT_SCHEMAS[kind]},
    }


def render(
    prompt: Prompt, questions: list[str], answers: dict[str, list[str]], reference: list[str] | None
) -> str:
    """The user message: `answers` maps "" (single) or "a" and "b" (pair) to each turn's answer."""
    fields = {f"question_{i + 1}": q for i, q in enumerate(questions)}
    for side, turns in answers.items():
        prefix = "answer_" + (f"{side}_" if side else "")
        fields.update({f"{prefix}{i + 1}": a for i, a in enumerate(turns)})
    refs = reference or []
    fields.update({f"ref_{i + 1}": r for i, r in enumerate(refs)})
    has_ref_2 = len(refs) > 1 and prompt.name.endswith("-ref")
    fields["ref_2_block"] = f"[Reference answer]\n{refs[1]}\n\n" if has_ref_2 else ""
    return prompt.user.format_map(fields)


def pick(kind: str, turn: int, reference: bool) -> Prompt:
    """The prompt for single or pair grading of turn 1 or 2, with or without a reference."""
    name = kind + ("-multi" if turn == 2 else "") + ("-ref" if reference else "")
    return PROMPTS[name]
