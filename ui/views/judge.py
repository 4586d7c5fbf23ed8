"""Judge results: the runs judgment jobs published, their per-model results and plot, and each
question with its answers and judgments."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
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

if single:
    rows = [
        {"Model": r["model"], "Score": r.get("score"),
         "95% CI": "–".join(f"{v:.2f}" for v in r.get("ci", [])),
         "Turn 1": r.get("turn_1", {}).get("score"), "Turn 2": r.get("turn_2", {}).get("score"),
         "Judged": r["judged"], "Parse failures": r["parse_failures"]}
        for r in run["models"]
    ]  # fmt: skip
else:
    rows = [{"Model": r["model"], "Wins": r["wins"], "Losses": r["losses"], "Ties": r["ties"],
             "Win rate": r["win_rate"], "Adjusted win rate": r["adjusted_win_rate"],
             "Parse failures": r["failures"]} for r in run["models"]]  # fmt: skip
st.dataframe(rows, hide_index=True, width="stretch")

figure, axes = plt.subplots(figsize=(8, 3.5))
if single:
    categories = sorted({c for r in run["models"] for c in r.get("categories", {})})
    width = 0.8 / max(len(run["models"]), 1)
    for i, r in enumerate(run["models"]):
        values = [r.get("categories", {}).get(c, 0) for c in categories]
        axes.bar(np.arange(len(categories)) + i * width, values, width, label=r["model"])
    axes.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories, rotation=30, ha="right")
    axes.set_ylim(0, 10)
    axes.set_ylabel("mean score per category")
else:
    names = [r["model"] for r in run["models"]]
    axes.barh(names, [r["adjusted_win_rate"] or 0 for r in run["models"]])
    axes.set_xlim(0, 1)
    axes.set_xlabel("adjusted win rate (a tie counts half)")
if single:
    axes.legend(fontsize=8)
figure.tight_layout()
st.pyplot(figure)

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
