"""A cleaning pipeline: read → steps → write, one stage at a time, each stage streaming the
previous stage's JSONL into its own, so that memory stays flat and a run that stops can resume
after its last completed stage.

Every stage accounts for every record: records in = kept + dropped (by reason), and out counts
what it wrote (more than kept when a step splits records, more when it adds some). Dropped
records go to the stage's `.rejected.jsonl` with their reason and where they came from.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import field_validator

from broker.jobs import CleanParams, JobAborted, Progress, StepSpec
from pipelines import records
from pipelines.stats import write_stats
from pipelines.steps import STEPS, Drop, Step


class CleanConfig(CleanParams):
    """A pipeline as a YAML file or the `clean` job's params give it; beyond the broker's schema
    (what the gateway checks), every step must exist and take the params given."""

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[StepSpec]) -> list[StepSpec]:
        for spec in steps:
            if spec.name not in STEPS:
                raise ValueError(f"unknown step {spec.name!r}; steps: {', '.join(sorted(STEPS))}")
            STEPS[spec.name].Params.model_validate(spec.params)
        return steps

    @classmethod
    def from_yaml(cls, path: Path) -> CleanConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()))


@dataclass
class StageReport:
    stage: str
    records_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    added: int = 0
    out: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.records_in == self.kept + sum(self.dropped.values())


class Run:
    """One pipeline run into `folder` (its stage files, reports and outputs)."""

    def __init__(
        self,
        config: CleanConfig,
        folder: Path,
        context: dict[str, Any] | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.folder = folder
        resolve = (context or {}).get("tokenizer", _hub_tokenizer)
        # A step without a tokenizer of its own uses the pipeline's.
        self.context = {**(context or {}), "tokenizer": lambda name: resolve(name or config.tokenizer)}
        self.progress = progress or (lambda stage, done, total: None)
        self.stop = stop or threading.Event()
        folder.mkdir(parents=True, exist_ok=True)
        self._done_file = folder / "stages.json"

    @property
    def stage_names(self) -> list[str]:
        return ["read", *(f"{i + 1:02d}-{s.name}" for i, s in enumerate(self.config.steps)), "write"]

    def completed(self) -> list[StageReport]:
        """Stages an earlier run of this same pipeline finished here (none if it was another)."""
        saved = self.folder / "config.yaml"
        if not self._done_file.exists() or not saved.exists():
            return []
        if yaml.safe_load(saved.read_text()) != self.config.model_dump():
            return []  # a different pipeline: start over
        return [StageReport(**r) for r in json.loads(self._done_file.read_text())]

    def execute(self) -> list[StageReport]:
        """Runs the stages not yet completed; returns every stage's report."""
        reports = self.completed()
        if not reports:
            for stale in ("stages.json", "stats.json", "report.json"):
                (self.folder / stale).unlink(missing_ok=True)
            resolved = yaml.safe_dump(self.config.model_dump(), sort_keys=False)
            (self.folder / "config.yaml").write_text(resolved)
        for index, name in enumerate(self.stage_names):
            if index < len(reports):
                continue  # done in an earlier run
            if name == "read":
                report = self._read()
            elif name == "write":
                report = self._write(self._stage_file(index - 1))
            else:
                spec = self.config.steps[index - 1]
                step = STEPS[spec.name](STEPS[spec.name].Params.model_validate(spec.params), self.context)
                report = self._step(name, step, self._stage_file(index - 1), self._stage_file(index))
            if not report.balanced:
                raise AssertionError(f"stage {name} lost records: {report}")
            reports.append(report)
            self._done_file.write_text(json.dumps([asdict(r) for r in reports], indent=1))
        (self.folder / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
        if not (self.folder / "stats.json").exists():
            self.progress("statistics", 0, 0)
            tokenizer = self.context["tokenizer"](None) if self.config.tokenizer else None
            write_stats(self.folder, tokenizer)
        return reports

    def _stage_file(self, index: int) -> Path:
        return self.folder / f"stage-{self.stage_names[index]}.jsonl"

    def _check(self) -> None:
        if self.stop.is_set():
            raise JobAborted()

    def _read(self) -> StageReport:
        report = StageReport("read")
        rejected = _Rejections(self.folder / "stage-read.rejected.jsonl", report)

        def normalized() -> Iterator[dict]:
            for path in map(Path, self.config.inputs):
                for item in records.read(path):
                    self._check()
                    report.records_in += 1
                    if isinstance(item, records.Rejected):
                        rejected.add(item)
                        continue
                    where, raw = item
                    try:
                        yield records.normalize(raw, fallback_id=where)
                        report.kept += 1
                    except records.NotAConversation as e:
                        rejected.add(records.Rejected("not_a_conversation", where, raw, str(e)))
                    if report.records_in % 1000 == 0:
                        self.progress("read", report.records_in, 0)

        report.out = records.write_jsonl(self._stage_file(0), normalized())
        rejected.close()
        self.progress("read", report.records_in, report.records_in)
        return report

    def _step(self, name: str, step: Step, source: Path, target: Path) -> StageReport:
        report = StageReport(name)
        total = _count_lines(source)
        self.progress(name, 0, total)
        rejected = _Rejections(target.with_suffix(".rejected.jsonl"), report)

        def outputs() -> Iterator[dict]:
            for number, record in enumerate(_jsonl(source), 1):
                self._check()
                report.records_in += 1
                try:
                    kept = step.apply(record)
                except Drop as drop:
                    rejected.add(
                        records.Rejected(
                            drop.reason, f"{source.name}:line {number}", drop.record or record, drop.detail
                        )
                    )
                    continue
                report.kept += bool(kept)
                yield from kept
                if number % 500 == 0:
                    self.progress(name, number, total)
            finished = step.finish()
            if step.adds:
                report.added = len(finished)
            else:
                report.kept += len(finished)
            yield from finished

        report.out = records.write_jsonl(target, outputs())
        report.notes = {k: v for k, v in step.notes().items() if v}
        rejected.close()
        self.progress(name, total, total)
        return report

    def _write(self, source: Path) -> StageReport:
        """The final files: train (and test) in the chosen format."""
        report = StageReport("write")
        total = _count_lines(source)
        self.progress("write", 0, total)
        test = test_indices(total, self.config.test_ratio, self.config.seed)
        shape = records.to_openai if self.config.format == "openai" else (lambda r: r)
        names = ["train", "test"] if self.config.test_ratio else ["train"]
        partial = {n: (self.folder / f"{n}.jsonl.partial").open("w", encoding="utf-8") for n in names}
        counts = Counter({name: 0 for name in names})
        for index, record in enumerate(_jsonl(source)):
            self._check()
            report.records_in += 1
            name = "test" if index in test else "train"
            partial[name].write(json.dumps(shape(record), ensure_ascii=False) + "\n")
            counts[name] += 1
            if report.records_in % 1000 == 0:
                self.progress("write", report.records_in, total)
        for name, handle in partial.items():
            handle.close()
            (self.folder / f"{name}.jsonl.partial").replace(self.folder / f"{name}.jsonl")
        report.kept = report.out = report.records_in
        report.notes = dict(counts)
        return report


def test_size(records_in: int, ratio: float) -> int:
    """Records in the test split: the ratio's share, rounded, but at least 1 when there is a ratio
    and two or more records, and never all of them (train keeps at least one)."""
    if ratio <= 0 or records_in < 2:
        return 0
    return min(max(round(records_in * ratio), 1), records_in - 1)


def test_indices(records_in: int, ratio: float, seed: int) -> set[int]:
    """Which records (by position) go to test: an exact-size sample, the same for the same seed."""
    return set(random.Random(seed).sample(range(records_in), test_size(records_in, ratio)))


class _Rejections:
    """A stage's dropped records, written as they come, counted by reason in its report."""

    def __init__(self, path: Path, report: StageReport) -> None:
        self.file = path.open("w", encoding="utf-8")
        self.report = report

    def add(self, rejected: records.Rejected) -> None:
        self.report.dropped[rejected.reason] = self.report.dropped.get(rejected.reason, 0) + 1
        self.file.write(json.dumps(rejected.to_json(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def _count_lines(path: Path) -> int:
    with path.open("rb") as data:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: data.read(1 << 20), b""))


def _hub_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    if name is None:
        raise ValueError("split_long needs a tokenizer: give `tokenizer` (a folder or hub id)")
    return AutoTokenizer.from_pretrained(name)


def clean_job(params: dict, folder: Path, context: dict, progress: Progress, stop: threading.Event) -> dict:
    """The `clean` job: runs (or resumes) the pipeline into the job's folder; its summary."""
    reports = Run(CleanConfig.model_validate(params), folder, context, progress, stop).execute()
    return {
        "stages": [asdict(r) for r in reports],
        "records_in": reports[0].records_in,
        "records_out": reports[-1].out,
        "outputs": sorted(str(p) for p in folder.glob("*.jsonl") if not p.name.startswith("stage-")),
    }
