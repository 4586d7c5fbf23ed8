"""Leaderboard: Bradley–Terry scores with 95% intervals from anonymous battles, the win-fraction
and battle-count heatmaps, and the intervals as a plot."""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import streamlit as st

from ui.widgets import attempt, client, fetch

st.title("Leaderboard")
board = fetch(client().leaderboard)

left, right = st.columns([3, 1])
if right.button("🔄 Recompute now", key="leaderboard_refresh"):
    job = attempt(client().refresh_leaderboard)
    if job:
        with st.spinner("Recomputing the ratings (a queued job)…"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = attempt(lambda job_id=job["id"]: client().job(job_id))
                if job is None or job["status"] in ("succeeded", "failed", "aborted"):
                    break
                time.sleep(0.5)
        if job and job["status"] == "succeeded":
            board = attempt(client().leaderboard) or board
        elif job:
            st.warning(
                f"The ratings job {job['id']} is {job['status']}: {job.get('error') or job['message']}"
            )

if not board["data"]:
    st.info("No ratings yet: anonymous battles in the Arena count once they have a vote. "
            "The leaderboard is recomputed on a schedule, or now with the button.")  # fmt: skip
    st.stop()

computed = time.strftime("%Y-%m-%d %H:%M", time.localtime(board["computed_at"]))
left.caption(f"{board['battles']} anonymous battles · computed {computed} · "
             f"{board['bootstrap_rounds']} bootstrap rounds")  # fmt: skip

rows = [
    {"Rank": r["rank"], "Model": r["model"], "Score": r["score"],
     "95% CI": f"{r['ci'][0]:.0f} – {r['ci'][1]:.0f}", "Votes": r["votes"], "Online Elo": r["elo"],
     "Organization": (r.get("metadata") or {}).get("organization", ""),
     "License": (r.get("metadata") or {}).get("license", "")}
    for r in board["data"]
]  # fmt: skip
st.dataframe(rows, hide_index=True, width="stretch")


def heatmap(matrix: list[list], title: str, fmt: str) -> plt.Figure:
    models = board["models"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(models), 1 + 0.7 * len(models)))
    image = axes.imshow(values, cmap="RdBu" if fmt == "{:.2f}" else "Blues")
    axes.set_xticks(range(len(models)), models, rotation=45, ha="right")
    axes.set_yticks(range(len(models)), models)
    axes.set_xlabel("model B")
    axes.set_ylabel("model A")
    for i in range(len(models)):
        for j in range(len(models)):
            if not np.isnan(values[i, j]):
                axes.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_title(title)
    figure.tight_layout()
    return figure


first, second = st.columns(2)
with first:
    st.pyplot(heatmap(board["win_fraction"], "Fraction of A's wins over B (ties left out)", "{:.2f}"))
with second:
    st.pyplot(heatmap(board["battle_count"], "Battles between A and B", "{:.0f}"))

figure, axes = plt.subplots(figsize=(7, 1 + 0.4 * len(board["data"])))
ordered = board["data"][::-1]
scores = np.array([r["score"] for r in ordered])
errors = np.array([[r["score"] - r["ci"][0] for r in ordered], [r["ci"][1] - r["score"] for r in ordered]])
axes.errorbar(scores, range(len(ordered)), xerr=errors, fmt="o", capsize=4)
axes.set_yticks(range(len(ordered)), [r["model"] for r in ordered])
axes.set_xlabel("score (Elo scale) with bootstrap 95% interval")
figure.tight_layout()
st.pyplot(figure)
