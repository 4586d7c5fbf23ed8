"""Corral's arena and judge numbers against FastChat's own code: online Elo, Bradley–Terry, the
battle-count and win-fraction matrices, on the same seeded battles (8 models, about 25% ties,
shuffled in time), at 500, 5,000 and 50,000 battles; then show_result.py's means and win rates on
FastChat-format judgment files, and compute_agreement.py's agreement (judge and humans, humans
among themselves, per turn, with and without ties) on MT-bench-format votes, all seeded; last,
the bootstrap: each model's 95% interval width from FastChat's get_bootstrap_result and from
Corral's, over several seeds each (resamples differ, so the check is that Corral's mean width lies
within FastChat's seed-to-seed spread).

FastChat (fschat==0.2.36) is installed in a venv of its own (with pandas and scikit-learn, which
Corral does not need), and its functions are taken from its installed
`fastchat/serve/monitor/elo_analysis.py` and run there; this script prints every difference:

    python bench/fidelity.py                       # the three sizes
    python bench/fidelity.py --write-test-data     # also the small case tests/test_ratings.py reads
    python bench/fidelity.py --sizes 500 --bootstrap-seeds 10
    python bench/fidelity.py --rating-systems ~/FastChat/fastchat/serve/monitor/rating_systems.py

FastChat fits Bradley–Terry with scikit-learn's default tolerance, which stops short of the
optimum of its own objective; the reference here is that objective solved to a tolerance of
1e-12 (the same code with scikit-learn told to go on), and FastChat's as shipped is printed
beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge.ratings import anonymous, leaderboard
from judge.results import agreement, pairwise, single

VENV = Path.home() / ".cache" / "corral-fidelity" / "fschat-0.2.36"
TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "fastchat_ratings.json"
WINNERS = ["model_a", "model_b", "tie", "tie (bothbad)"]

# Runs inside FastChat's venv: its functions, read from its installed source (the module itself
# imports plotly and the rest of FastChat's serving stack).
REFERENCE = r"""
import ast, json, math, sys
from collections import defaultdict
import numpy as np, pandas as pd
import fastchat, sklearn.linear_model as sk
from pathlib import Path

source = (Path(fastchat.__file__).parent / "serve/monitor/elo_analysis.py").read_text()
wanted = {"compute_elo", "compute_elo_mle_with_tie", "compute_pairwise_win_fraction"}
module = ast.Module([n for n in ast.parse(source).body if getattr(n, "name", "") in wanted], [])
space = {"defaultdict": defaultdict, "math": math, "np": np, "pd": pd}
exec(compile(module, "elo_analysis.py", "exec"), space)

battles = pd.DataFrame(json.load(sys.stdin))
battles = battles.sort_values(ascending=True, by=["tstamp"])  # as report_elo_analysis_results
battles = battles[battles["anony"]].reset_index(drop=True)
no_ties = battles[~battles["winner"].str.contains("tie")]
shipped = space["compute_elo_mle_with_tie"](battles)
Plain = sk.LogisticRegression
sk.LogisticRegression = lambda **kw: Plain(**kw, tol=1e-12, max_iter=100_000)  # to its optimum
exact = space["compute_elo_mle_with_tie"](battles)
counts = pd.pivot_table(no_ties, index="model_a", columns="model_b", aggfunc="size", fill_value=0)
counts = counts + counts.T  # visualize_battle_count
fraction = space["compute_pairwise_win_fraction"](no_ties, None)
json.dump({
    "elo": space["compute_elo"](battles),
    "bt_shipped": shipped.to_dict(),
    "bt": exact.to_dict(),
    "battle_count": {a: {b: int(v) for b, v in row.items()} for a, row in counts.to_dict("index").items()},
    "win_fraction": {a: {b: (None if v != v else v) for b, v in row.items()}
                     for a, row in fraction.to_dict("index").items()},
    "num_battles": (battles["model_a"].value_counts() + battles["model_b"].value_counts()).to_dict(),
}, sys.stdout)
"""


# Runs inside FastChat's venv: its bootstrap (get_bootstrap_result over compute_elo_mle_with_tie,
# as report_elo_analysis_results calls it) once per seed; prints each model's 95% interval width.
REFERENCE_BOOTSTRAP = r"""
import ast, json, math, sys
from collections import defaultdict
import numpy as np, pandas as pd
import fastchat
from pathlib import Path

source = (Path(fastchat.__file__).parent / "serve/monitor/elo_analysis.py").read_text()
wanted = {"compute_elo_mle_with_tie", "get_bootstrap_result"}
module = ast.Module([n for n in ast.parse(source).body if getattr(n, "name", "") in wanted], [])
space = {"defaultdict": defaultdict, "math": math, "np": np, "pd": pd, "tqdm": lambda it, **kw: it}
exec(compile(module, "elo_analysis.py", "exec"), space)

data = json.load(sys.stdin)
battles = pd.DataFrame(data["battles"]).sort_values(ascending=True, by=["tstamp"])
battles = battles[battles["anony"]].reset_index(drop=True)
widths = []
for seed in data["seeds"]:
    np.random.seed(seed)  # DataFrame.sample draws from numpy's global generator
    frame = space["get_bootstrap_result"](battles, space["compute_elo_mle_with_tie"], data["rounds"])
    widths.append((frame.quantile(0.975) - frame.quantile(0.025)).to_dict())
json.dump(widths, sys.stdout)
"""


# Runs inside FastChat's venv: later FastChat's unregularised Bradley–Terry
# (serve/monitor/rating_systems.py, not in any fschat release: read from a checkout), as shipped
# (L-BFGS, gtol 1e-6) and told to go on (gtol 1e-12).
REFERENCE_MLE = r"""
import ast, json, math, sys
import numpy as np, pandas as pd
from scipy.special import expit
from scipy.optimize import minimize

data = json.load(sys.stdin)
wanted = {"get_matchups_models", "preprocess_for_bt", "bt_loss_and_grad", "fit_bt", "scale_and_offset",
          "compute_bt"}
module = ast.Module([n for n in ast.parse(data["source"]).body if getattr(n, "name", "") in wanted], [])
space = {"math": math, "np": np, "pd": pd, "expit": expit, "minimize": minimize}
exec(compile(module, "rating_systems.py", "exec"), space)
battles = pd.DataFrame(data["battles"])
battles = battles[battles["anony"]].reset_index(drop=True)
json.dump({"shipped": space["compute_bt"](battles).to_dict(),
           "exact": space["compute_bt"](battles, tol=1e-12).to_dict()}, sys.stdout)
"""


# Runs inside FastChat's venv: show_result.py's and compute_agreement.py's functions on the files.
REFERENCE_JUDGE = r"""
import ast, json, sys, types
import numpy as np, pandas as pd
import fastchat
from pathlib import Path

def functions(path, wanted, extra):
    source = (Path(fastchat.__file__).parent / path).read_text()
    module = ast.Module([n for n in ast.parse(source).body if getattr(n, "name", "") in wanted], [])
    space = {"np": np, "pd": pd, "json": json, **extra}
    exec(compile(module, path, "exec"), space)
    return space

data = json.load(sys.stdin)
shown = []
show = functions("llm_judge/show_result.py", {"display_result_single", "display_result_pairwise"},
                 {"print": lambda *a: shown.extend(x for x in a if isinstance(x, pd.DataFrame))})
out = {}
for mode, key in (("single", "display_result_single"), ("pair", "display_result_pairwise")):
    shown.clear()
    args = types.SimpleNamespace(input_file=data[mode + "_file"], bench_name="mt_bench", model_list=None,
                                 baseline_model=None)
    show[key](args)
    out[mode] = [frame.reset_index().to_dict("records") for frame in shown]
agree = functions("llm_judge/compute_agreement.py",
                  {"get_judge_name", "revert", "get_mt_bench_votes_data", "convertvote", "equalvote",
                   "get_mt_bench_agreement"}, {})
votes = agree["get_mt_bench_votes_data"]([data["gpt4"], data["humans"]])
out["agreement"] = {}
for judges in (("gpt4-pair", "human"), ("human", "human")):
    for turn in (0, 1):
        for ban in ([], ["tie"]):
            ok, total = agree["get_mt_bench_agreement"](votes[turn], *judges, ban=ban)
            out["agreement"][f"{judges[0]}|{turn + 1}|{bool(ban)}"] = [ok, total]
json.dump(out, sys.stdout, default=float)
"""


def fastchat_python() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").exists():
        print(f"installing fschat==0.2.36, pandas and scikit-learn in {VENV} (once)", flush=True)
        venv.create(VENV, with_pip=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", "fschat==0.2.36"], check=True)
        subprocess.run([*pip, "numpy", "pandas", "scikit-learn"], check=True)
        (VENV / ".installed").touch()
    return python


def seeded_battles(count: int, seed: int, models: int = 8) -> list[dict]:
    """Battles between random pairs won with Bradley–Terry odds from spread-out strengths, about a
    quarter of them ties, a few not anonymous, with times in shuffled order."""
    rng = np.random.default_rng(seed)
    names = [f"model-{i}" for i in range(models)]
    strength = rng.normal(1000, 120, models)
    battles = []
    for at in rng.permutation(count):
        a, b = rng.choice(models, 2, replace=False)
        p_a = 1 / (1 + 10 ** ((strength[b] - strength[a]) / 400))
        draw = rng.random()
        winner = (
            WINNERS[2 + int(rng.random() < 0.3)]
            if draw < 0.25
            else "model_a"
            if draw < 0.25 + 0.75 * p_a
            else "model_b"
        )
        anony = bool(rng.random() < 0.95)
        battles.append(
            {
                "model_a": names[a],
                "model_b": names[b],
                "winner": winner,
                "anony": anony,
                "tstamp": 1.7e9 + float(at),
            }
        )
    return battles


def reference(python: Path, battles: list[dict]) -> dict:
    done = subprocess.run(
        [str(python), "-c", REFERENCE], input=json.dumps(battles), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def corral(battles: list[dict]) -> dict:
    board = leaderboard(anonymous(battles), rounds=1)
    index = {m: i for i, m in enumerate(board.models)}

    def matrix(values: np.ndarray) -> dict:
        return {a: {b: values[index[a], index[b]] for b in board.models} for a in board.models}

    return {
        "elo": board.elo,
        "bt": dict(zip(board.models, board.ratings, strict=True)),
        "battle_count": matrix(board.battles),
        "win_fraction": matrix(board.win_fraction),
        "num_battles": dict(zip(board.models, board.total, strict=True)),
    }


def differences(ours: dict, theirs: dict) -> dict[str, float]:
    """The largest absolute difference of each figure (NaN where FastChat has none)."""
    out = {}
    for key in ("elo", "bt", "num_battles"):
        out[key] = max(abs(ours[key][m] - theirs[key][m]) for m in theirs[key])
    out["bt_shipped"] = max(abs(ours["bt"][m] - theirs["bt_shipped"][m]) for m in theirs["bt"])
    for key in ("battle_count", "win_fraction"):
        gaps = [
            abs(ours[key][a][b] - value)
            for a, row in theirs[key].items()
            for b, value in row.items()
            if value is not None and a != b
        ]
        out[key] = max(gaps)
    return out


def mle_differences(python: Path, source: Path, battles: list[dict]) -> dict[str, float]:
    """Corral's `bt-mle` against later FastChat's compute_bt: the largest gap to the exact
    optimum of its likelihood, and to its solver as shipped."""
    done = subprocess.run(
        [str(python), "-c", REFERENCE_MLE],
        input=json.dumps({"battles": battles, "source": source.read_text()}),
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(done.stdout)
    board = leaderboard(anonymous(battles), rounds=1, system="bt-mle")
    ours = dict(zip(board.models, board.ratings, strict=True))
    return {
        key: max(abs(ours[m] - value) for m, value in theirs[key].items()) for key in ("exact", "shipped")
    }


def bootstrap_widths(python: Path, battles: list[dict], seeds: list[int], rounds: int) -> tuple[dict, dict]:
    """Each model's 95% interval width per seed, FastChat's and Corral's (same battles, `rounds`
    resamples each): the resamples differ, so the widths are compared with the spread across
    seeds, not one to one."""
    done = subprocess.run(
        [str(python), "-c", REFERENCE_BOOTSTRAP],
        input=json.dumps({"battles": battles, "seeds": seeds, "rounds": rounds}),
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(done.stdout)
    ours = []
    for seed in seeds:
        board = leaderboard(anonymous(battles), rounds=rounds, seed=seed)
        ours.append(dict(zip(board.models, board.upper - board.lower, strict=True)))
    models = sorted(theirs[0])
    return {m: [w[m] for w in theirs] for m in models}, {m: [float(w[m]) for w in ours] for m in models}


def print_bootstrap(theirs: dict, ours: dict, size: int, rounds: int) -> None:
    """Per model: both sides' mean width and seed-to-seed spread (min-max), and whether Corral's
    mean lies within FastChat's mean ± 2 standard deviations across seeds."""
    print(
        f"bootstrap 95% interval widths, {size} battles, {rounds} rounds, {len(ours[next(iter(ours))])} seeds"
    )
    print(f"{'model':<10} {'FastChat mean':>13} {'min-max':>15} {'Corral mean':>12} {'min-max':>15}  within")
    inside = 0
    for model in theirs:
        a, b = np.array(theirs[model]), np.array(ours[model])
        ok = abs(b.mean() - a.mean()) <= 2 * a.std(ddof=1)
        inside += ok
        print(
            f"{model:<10} {a.mean():>13.2f} {a.min():>7.2f}-{a.max():<7.2f} {b.mean():>12.2f}"
            f" {b.min():>7.2f}-{b.max():<7.2f}  {'yes' if ok else 'NO'}"
        )
    print(
        f"Corral's mean width within FastChat's seed-to-seed spread (±2 sd): {inside} of {len(theirs)} models"
    )


VOTES = ["model_a", "model_b", "tie", "tie (bothbad)"]
SWAPPED = {"model_a": "model_b", "model_b": "model_a"}


def judge_files(seed: int, folder: Path) -> dict:
    """FastChat-format judgment files and MT-bench-format votes, seeded: 80 questions, 2 turns,
    5 models; -1 ratings and "error" games among them; 1–3 expert votes per item, some by
    authors, about a quarter ties."""
    rng = np.random.default_rng(seed)
    models = [f"model-{i}" for i in range(5)]
    singles, pairs, gpt4, humans = [], [], [], []

    def vote() -> str:
        return VOTES[int(rng.choice(4, p=[0.4, 0.35, 0.15, 0.1]))]

    for question in range(81, 161):
        for turn in (1, 2):
            item = {"question_id": question, "turn": turn}
            for model in models:
                score = -1 if rng.random() < 0.05 else int(rng.integers(1, 11))
                singles.append({**item, "model": model, "score": score})
            a, b = (str(m) for m in rng.choice(models, 2, replace=False))
            g1, g2 = (
                ["model_1", "model_2", "tie", "error"][int(rng.choice(4, p=[0.4, 0.35, 0.2, 0.05]))]
                for _ in "12"
            )
            pairs.append({**item, "model_1": a, "model_2": b, "g1_winner": g1, "g2_winner": g2})
            gpt4.append({**item, "model_a": a, "model_b": b, "winner": vote(), "judge": ["gpt-4", "pair-v2"]})
            for voter in range(int(rng.integers(1, 4))):
                who = f"author_{voter}" if rng.random() < 0.15 else f"expert_{voter}"
                if rng.random() < 0.5:  # the pair shown in the other order
                    humans.append(
                        {
                            **item,
                            "model_a": b,
                            "model_b": a,
                            "winner": SWAPPED.get(v := vote(), v),
                            "judge": who,
                        }
                    )
                else:
                    humans.append({**item, "model_a": a, "model_b": b, "winner": vote(), "judge": who})
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, records in (("single", singles), ("pair", pairs)):
        files[f"{name}_file"] = str(folder / f"gpt-4_{name}.jsonl")
        Path(files[f"{name}_file"]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return {**files, "singles": singles, "pairs": pairs, "gpt4": gpt4, "humans": humans}


def judge_differences(python: Path, data: dict) -> dict[str, float]:
    done = subprocess.run(
        [str(python), "-c", REFERENCE_JUDGE],
        input=json.dumps(data),
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(done.stdout)
    gaps: dict[str, float] = {}
    ours = {r["model"]: r for r in single(data["singles"], {})}
    turn_1, turn_2, overall = theirs["single"]
    gaps["show_result single"] = max(
        max(abs(ours[r["model"]][f"turn_{t}"]["score"] - r["score"]) for r in frame)
        for t, frame in ((1, turn_1), (2, turn_2))
    )
    gaps["show_result single"] = max(
        gaps["show_result single"], *(abs(ours[r["model"]]["score"] - r["score"]) for r in overall)
    )
    by_model = {r["model"]: r for r in pairwise(data["pairs"])}
    (table,) = theirs["pair"]
    counts = [
        abs(by_model[r["model"]][ours] - r[theirs_])
        for r in table
        for ours, theirs_ in (("wins", "win"), ("ties", "tie"))
    ]
    rates = [abs(by_model[r["model"]]["adjusted_win_rate"] - r["win_rate_adjusted"]) for r in table]
    gaps["show_result pairwise"] = max(counts + rates)
    worst = 0.0
    for name, (ok, total) in theirs["agreement"].items():
        judges, turn, no_ties = name.split("|")
        result = (
            agreement(data["gpt4"], data["humans"]) if judges == "gpt4-pair" else agreement(data["humans"])
        )
        counted = result["turns"][turn]
        ours_total = counted["decisive" if no_ties == "True" else "shared"]
        ours_rate = counted["without_ties" if no_ties == "True" else "with_ties"]
        worst = max(worst, abs(ours_total - total), abs((ours_rate or 0) - (ok / total if total else 0)))
    gaps["compute_agreement"] = worst
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5_000, 50_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-test-data", action="store_true")
    parser.add_argument(
        "--rating-systems",
        type=Path,
        help="later FastChat's serve/monitor/rating_systems.py (from a checkout): check bt-mle against it",
    )
    parser.add_argument(
        "--bootstrap-size", type=int, default=5_000, help="battles for the bootstrap check (0: skip)"
    )
    parser.add_argument("--bootstrap-rounds", type=int, default=100)
    parser.add_argument("--bootstrap-seeds", type=int, default=5)
    args = parser.parse_args()
    python = fastchat_python()
    tolerances = {"elo": 1e-6, "bt": 1e-3, "battle_count": 0, "win_fraction": 1e-9, "num_battles": 0}
    print(f"{'battles':>8} " + " ".join(f"{k:>14}" for k in [*tolerances, "bt_shipped"]))
    for size in args.sizes:
        battles = seeded_battles(size, args.seed)
        gaps = differences(corral(battles), reference(python, battles))
        marks = {k: ("" if k not in tolerances or gaps[k] <= tolerances[k] else " !") for k in gaps}
        print(f"{size:>8} " + " ".join(f"{gaps[k]:>12.3g}{marks[k]:2}" for k in [*tolerances, "bt_shipped"]))
    print("largest |Corral - FastChat|; '!' marks one over its tolerance", tolerances)
    with tempfile.TemporaryDirectory() as folder:
        for seed in (args.seed, args.seed + 1):
            gaps = judge_differences(python, judge_files(seed, Path(folder)))
            print(f"judging, seed {seed}: " + ", ".join(f"{k} {v:.3g}" for k, v in gaps.items()))
    if args.rating_systems:
        for size in args.sizes:
            gaps = mle_differences(python, args.rating_systems, seeded_battles(size, args.seed))
            print(
                f"bt-mle, {size} battles: |Corral - compute_bt| {gaps['exact']:.3g} (its optimum),"
                f" {gaps['shipped']:.3g} (as shipped)"
            )
    if args.bootstrap_size:
        battles = seeded_battles(args.bootstrap_size, args.seed)
        seeds = list(range(args.bootstrap_seeds))
        print_bootstrap(
            *bootstrap_widths(python, battles, seeds, args.bootstrap_rounds),
            args.bootstrap_size,
            args.bootstrap_rounds,
        )
    if args.write_test_data:
        battles = seeded_battles(120, seed=7, models=5)
        TEST_DATA.parent.mkdir(exist_ok=True)
        TEST_DATA.write_text(
            json.dumps({"battles": battles, "fastchat": reference(python, battles)}, indent=1)
        )
        print(f"wrote {TEST_DATA}")


if __name__ == "__main__":
    main()
