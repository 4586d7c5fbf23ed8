"""Arena analytics that Chatbot Arena's monitor runs, over the battles read from the vote log
(`judge.ratings.battles_from_log`): the clean-battle filters applied before rating, category
leaderboards, style control, outlier voters and basic statistics.

- Filters drop, and count by reason: a banned user's votes; anonymous battles whose answers name
  a model or its maker (an identity leak makes the vote not blind); answers carrying an error
  text, or whose generation failed; unfinished (empty) answers; votes past a user's daily cap.
  An answer cut by max_tokens is kept: the voter judged what was shown, as Chatbot Arena keeps it.
- Categories: the prompt's language, long prompts, multi-turn battles, coding.
- Style control: a contextual Bradley–Terry whose features are the answers' length and markdown
  counts (headers, list items, bold), as differences over sums, standardised, as later FastChat
  fits it; the ratings it gives are the models' strengths with style held equal.
- Outlier voters: users whose decided votes side with the rating's favourite far less often than
  everyone's do (a one-sided binomial z below -3), reported, not dropped.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from judge.ratings import BASE, MEAN_RATING, SCALE, Battle

# Names of models and their makers that give an anonymous side away (lower case, whole words).
_IDENTITIES = re.compile(
    r"\b(openai|chatgpt|gpt-?[345](?:\.\d)?(?:o|-turbo)?|anthropic|claude|llama|meta ai|mistral|mixtral|"
    r"gemini|bard|qwen|alibaba|deepseek|smollm\w*|hugging ?face|vicuna|lmsys|phi-?\d|gemma)\b",
    re.IGNORECASE,
)
# Error texts an answer may carry instead of an answer (FastChat's serving errors, Corral's).
_ERRORS = ("NETWORK ERROR DUE TO HIGH TRAFFIC", "$MODERATION$", "(error:", "CONVERSATION LIMIT")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|#include|function\b|public |fn |let |const |SELECT )"
)
_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
STYLE_FEATURES = ("length", "headers", "list_items", "bold")


@dataclass(frozen=True)
class Filters:
    banned_users: frozenset[str] = frozenset()
    # Votes a user may cast in a UTC day that count (0: no cap); later ones are dropped.
    daily_vote_cap: int = 0
    # A battle whose last prompt, as either model read it, holds at least this many tokens is
    # "long" (for a log without token counts, FastChat's: WORDS_PER_TOKEN words a token).
    long_prompt_tokens: int = 500


@dataclass
class Cleaned:
    battles: list[dict]
    dropped: Counter = field(default_factory=Counter)


def _words(text: str) -> int:
    return len(text.split())


def _leak(battle: dict) -> bool:
    answers = " ".join(battle["answers_a"] + battle["answers_b"])
    names = {part for model in (battle["model_a"], battle["model_b"]) for part in re.split(r"[-_/ ]", model)}
    own = [n for n in names if len(n) >= 4 and not n.isdigit()]
    lowered = answers.lower()
    return bool(_IDENTITIES.search(answers)) or any(
        re.search(rf"\b{re.escape(n.lower())}\b", lowered) for n in own
    )


def clean(battles: list[dict], filters: Filters) -> Cleaned:
    """The battles that count, in time order, and how many each filter dropped."""
    out = Cleaned([])
    per_day: Counter = Counter()
    for battle in sorted(battles, key=lambda b: b["tstamp"]):
        answers = battle["answers_a"] + battle["answers_b"]
        finishes = [f for side in battle["finish_reasons"] for f in side]
        if battle["judge"] in filters.banned_users:
            reason = "banned_user"
        elif battle["anony"] and _leak(battle):
            reason = "identity_leak"
        elif any(marker in answer for answer in answers for marker in _ERRORS) or any(
            f.startswith("error") for f in finishes
        ):
            reason = "error_text"
        elif any(not answer.strip() for answer in answers):
            reason = "unfinished"
        else:
            day = (battle["judge"], time.strftime("%Y-%m-%d", time.gmtime(battle["tstamp"])))
            per_day[day] += 1
            reason = (
                "daily_vote_cap" if filters.daily_vote_cap and per_day[day] > filters.daily_vote_cap else ""
            )
        if reason:
            out.dropped[reason] += 1
        else:
            out.battles.append(battle)
    return out


def _is_code(battle: dict) -> bool:
    texts = battle["prompts"] + battle["answers_a"] + battle["answers_b"]
    if any("```" in text for text in texts):
        return True
    return sum(bool(_CODE_LINE.match(line)) for text in battle["prompts"] for line in text.splitlines()) >= 2


# English prose runs at about 0.75 words a BPE token (OpenAI's rule of thumb).
WORDS_PER_TOKEN = 0.75


def prompt_tokens(battle: dict) -> float:
    """The tokens of the battle's last prompt (the conversation so far, in its template) as the
    larger of the two models read it, from the log; words ÷ WORDS_PER_TOKEN where it has none."""
    read = [side[-1] for side in battle.get("prompt_tokens") or [] if side and side[-1]]
    return max(read) if read else _words("\n".join(battle["prompts"])) / WORDS_PER_TOKEN


def categories(battle: dict, filters: Filters, language) -> list[str]:  # type: ignore[no-untyped-def]
    """The categories a battle counts in (besides the overall board)."""
    prompt = "\n".join(battle["prompts"])
    found = [f"language:{language(prompt)}"] if prompt.strip() else []
    if prompt_tokens(battle) >= filters.long_prompt_tokens:
        found.append("long_prompt")
    if len(battle["prompts"]) >= 2:
        found.append("multi_turn")
    if _is_code(battle):
        found.append("coding")
    return found


def by_category(battles: list[dict], filters: Filters) -> dict[str, list[dict]]:
    import py3langid

    def language(text: str) -> str:
        return str(py3langid.classify(text)[0])

    grouped: dict[str, list[dict]] = defaultdict(list)
    for battle in battles:
        for name in categories(battle, filters, language):
            grouped[name].append(battle)
    return dict(grouped)


def rated_records(battles: list[dict]) -> list[dict]:
    """The records `judge.ratings.anonymous` rates, in its order (so they line up with it)."""
    kept = [b for b in battles if b.get("anony", False) and b["model_a"] != b["model_b"]]
    return sorted(kept, key=lambda b: b.get("tstamp", 0))


def style_counts(answers: list[str]) -> np.ndarray:
    text = "\n".join(answers)
    return np.array(
        [_words(text), len(_HEADER.findall(text)), len(_LIST_ITEM.findall(text)), len(_BOLD.findall(text))],
        float,
    )


@dataclass
class StyleControl:
    models: list[str]
    ratings: np.ndarray  # strengths with style held equal, Elo scale
    coefficients: dict[str, float]  # each feature's effect on the log-odds, per standard deviation
    lower: np.ndarray  # percentile bootstrap 95% interval of the ratings (NaN with no rounds)
    upper: np.ndarray


def style_control(battles: list[dict], reg: float = 0.5, rounds: int = 0, seed: int = 0) -> StyleControl:
    """Later FastChat's contextual Bradley–Terry: log-odds of model_a winning = ln 10 × (w_a - w_b)
    + features · beta, features the standardised (a - b) / (a + b + 1) of each style count, a tie
    half a win, an L2 penalty of reg/4 × |params|² (its parity with the duplicated-rows fit);
    solved by Newton's method. Intervals from `rounds` resamples of the battles, as the plain
    board's (the features standardised once, on all battles)."""
    kept = rated_records(battles)
    rated = [Battle.from_record(b) for b in kept]
    models = sorted({b.model_a for b in rated} | {b.model_b for b in rated})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[b.model_a] for b in rated], dtype=int)
    c = np.array([index[b.model_b] for b in rated], dtype=int)
    outcome = np.array([b.score_a for b in rated])
    counts_a = np.array([style_counts(b["answers_a"]) for b in kept]).reshape(-1, len(STYLE_FEATURES))
    counts_b = np.array([style_counts(b["answers_b"]) for b in kept]).reshape(-1, len(STYLE_FEATURES))
    features = (counts_a - counts_b) / (counts_a + counts_b + 1)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1)
    n = len(models)
    design = np.zeros((len(rated), n + features.shape[1]))
    design[np.arange(len(rated)), a] += math.log(BASE)
    design[np.arange(len(rated)), c] -= math.log(BASE)
    design[:, n:] = features
    params = _contextual_fit(design, outcome, np.ones(len(rated)), reg)
    rng = np.random.default_rng(seed)
    samples = np.array(
        [
            _contextual_fit(
                design, outcome, rng.multinomial(len(rated), np.full(len(rated), 1 / len(rated))), reg
            )
            for _ in range(rounds if len(rated) else 0)
        ]
    ).reshape(-1, len(params))
    lower, upper = (
        (SCALE * np.percentile(samples[:, :n], q, axis=0) + MEAN_RATING)
        if len(samples)
        else np.full(n, np.nan)
        for q in (2.5, 97.5)
    )
    ratings = SCALE * params[:n] + MEAN_RATING
    coefficients = dict(zip(STYLE_FEATURES, map(float, params[n:]), strict=True))
    return StyleControl(models, ratings, coefficients, lower, upper)


def _contextual_fit(design: np.ndarray, outcome: np.ndarray, weights: np.ndarray, reg: float) -> np.ndarray:
    """The penalised logistic fit of `style_control`, each battle counted `weights` times."""
    params = np.zeros(design.shape[1])
    penalty = reg / 2  # the gradient of reg/4 × |params|²
    for _ in range(100):
        p = 1 / (1 + np.exp(-design @ params))
        gradient = design.T @ (weights * (p - outcome)) + penalty * params
        hessian = (design * (weights * p * (1 - p))[:, None]).T @ design + penalty * np.eye(len(params))
        step = np.linalg.solve(hessian, gradient)
        params -= step
        if np.abs(step).max() < 1e-12:
            break
    return params


def outlier_voters(
    battles: list[Battle], voters: list[str], ratings: dict[str, float], min_votes: int = 10
) -> list[dict]:
    """Users whose decided votes side with the higher-rated model much less often than all votes
    do: one-sided z of their agreement rate below -3, among users with `min_votes` or more."""
    agree: dict[str, list[bool]] = defaultdict(list)
    for battle, voter in zip(battles, voters, strict=True):
        if battle.score_a == 0.5 or ratings[battle.model_a] == ratings[battle.model_b]:
            continue
        favourite_a = ratings[battle.model_a] > ratings[battle.model_b]
        agree[voter].append((battle.score_a == 1.0) == favourite_a)
    everyone = [x for votes in agree.values() for x in votes]
    if not everyone:
        return []
    rate = sum(everyone) / len(everyone)
    found = []
    for voter, votes in agree.items():
        if len(votes) < min_votes or rate in (0.0, 1.0):
            continue
        own = sum(votes) / len(votes)
        z = (own - rate) / math.sqrt(rate * (1 - rate) / len(votes))
        if z < -3:
            found.append({"user": voter, "votes": len(votes), "agreement": own, "z": z})
    return sorted(found, key=lambda r: r["z"])


def statistics(battles: list[dict]) -> dict:
    """Votes per UTC day, per model and per user (the 20 busiest, and how many users there are)."""
    days = Counter(time.strftime("%Y-%m-%d", time.gmtime(b["tstamp"])) for b in battles)
    models = Counter(m for b in battles for m in (b["model_a"], b["model_b"]))
    users = Counter(b["judge"] for b in battles)
    return {
        "votes_per_day": dict(sorted(days.items())),
        "battles_per_model": dict(models.most_common()),
        "votes_per_user": dict(users.most_common(20)),
        "users": len(users),
    }
