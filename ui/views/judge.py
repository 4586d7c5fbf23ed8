"""Judge results: the runs judgment jobs published, their per-model results and plot, and each
question with its answers and judgments."""

from __future__ import annotations

import altair as alt
import streamlit as st

from ui.widgets import client, fetch

st.title("Judge results")
runs = fetch(client().judge_runs)
if not runs:
    st.info("No judge results yet. Run one: `corral judge run --models A,B --judge J --mode single`.")
    st.stop()

name = st.selectbox("Run (question set / mode / judge)", [r["name"] for r in runs], key="judge_run")
run = fetch(lambda: client().judge_run(name))
single = run["mode"] == "single"
st.caption(f"{run['judgments']} judgments, {run['parse_failures']} parse failures (left out of every figure)")
if run.get("warning"):
    st.warning(run["warning"], icon="⚖️")


def shown(value: float | None, places: int) -> float | None:
    """results.json is unrounded; the page rounds what it shows."""
    return None if value is None else round(value, places)


if single:
    rows = [
        {
            "Model": r["model"],
            "Score": shown(r.get("score"), 2),
            "95% CI": "–".join(f"{v:.2f}" for v in r.get("ci", [])),
            "Turn 1": shown(r.get("turn_1", {}).get("score"), 2),
            "Turn 2": shown(r.get("turn_2", {}).get("score"), 2),
            "Judged": r["judged"],
            "Parse failures": r["parse_failures"],
        }
        for r in run["models"]
    ]
else:
    rows = [
        {
            "Model": r["model"],
            "Wins": r["wins"],
            "Losses": r["losses"],
            "Ties": r["ties"],
            "Win rate": shown(r["win_rate"], 3),
            "Adjusted win rate": shown(r["adjusted_win_rate"], 3),
            "Parse failures": r["failures"],
        }
        for r in run["models"]
    ]
st.dataframe(rows, hide_index=True, width="stretch")

if single:
    bars = [
        {"Model": r["model"], "Category": category, "Mean score": score}
        for r in run["models"]
        for category, score in r.get("categories", {}).items()
    ]
    if bars:
        chart = (
            alt.Chart(alt.Data(values=bars))
            .mark_bar()
            .encode(
                x=alt.X("Category:N", title=None, axis=alt.Axis(labelAngle=-30)),
                xOffset="Model:N",
                y=alt.Y(
                    "Mean score:Q", scale=alt.Scale(domain=[0, 10]), title="mean score per category (1–10)"
                ),
                color="Model:N",
                tooltip=["Model:N", "Category:N", alt.Tooltip("Mean score:Q", format=".2f")],
            )
        )
        st.altair_chart(chart, height=340)
else:
    bars = [
        {"Model": r["model"], "Outcome": outcome, "Pairs": r[key]}
        for r in run["models"]
        for outcome, key in (("win", "wins"), ("tie", "ties"), ("loss", "losses"))
    ]
    if any(b["Pairs"] for b in bars):
        chart = (
            alt.Chart(alt.Data(values=bars))
            .mark_bar()
            .encode(
                y=alt.Y("Model:N", title=None, axis=alt.Axis(labelLimit=320)),
                x=alt.X("Pairs:Q", stack="zero", title="judged pairs"),
                color=alt.Color(
                    "Outcome:N",
                    scale=alt.Scale(domain=["win", "tie", "loss"], range=["#2ca02c", "#aaaaaa", "#d62728"]),
                ),
                tooltip=["Model:N", "Outcome:N", "Pairs:Q"],
            )
        )
        st.altair_chart(chart, height=max(140, 40 * len(run["models"]) + 60))

st.subheader("Questions")
detail = run.get("questions_detail", [])
labels = {f"{q['question_id']} · {q['category']} · {q['turns'][0][:60]}": q for q in detail}
if not labels:
    st.stop()
question = labels[st.selectbox("Question", list(labels), key="judge_question")]
for turn, text in enumerate(question["turns"], 1):
    st.markdown(f"**Turn {turn}.** {text}")
    if question.get("reference"):
        st.caption(f"Reference: {question['reference'][turn - 1]}")
    for model, answers in question["answers"].items():
        if turn <= len(answers):
            with st.expander(f"{model}"):
                st.markdown(answers[turn - 1])
    for j in (j for j in question["judgments"] if j["turn"] == turn):
        who = j.get("model") or f"{j['model_1']} vs {j['model_2']}"
        outcome = j.get("score") if single else j.get("winner")
        label = f"⚖️ {who}: {outcome if outcome is not None else 'parse failure: ' + str(j['parse_failure'])}"
        with st.expander(label):
            st.text(j.get("judgment") or f"order 1:\n{j['g1_judgment']}\n\norder 2:\n{j['g2_judgment']}")
