"""Leaderboard: Bradley–Terry scores with 95% intervals from anonymous battles, overall or by
category, with style-controlled scores beside them; the win-fraction and battle-count heatmaps,
the intervals as a plot, what the clean-battle filters dropped, outlier voters and vote
statistics; models shown by their display names."""

from __future__ import annotations

import time

import altair as alt
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
    st.info(
        "No ratings yet: anonymous battles in the Arena count once they have a vote. "
        "The leaderboard is recomputed on a schedule, or now with the button."
    )
    st.stop()

overall = board
names = ["overall", *sorted(overall.get("categories") or {})]
category = left.selectbox("Category", names, key="leaderboard_category")
if category != "overall":
    board = fetch(lambda: client().leaderboard(category))
computed = time.strftime("%Y-%m-%d %H:%M", time.localtime(board["computed_at"]))
filters = overall.get("filters") or {}
dropped = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in (filters.get("dropped") or {}).items())
left.caption(
    f"{board['battles']} anonymous battles · computed {computed} · "
    f"{board['bootstrap_rounds']} bootstrap rounds · {board.get('rating_system', 'bt')}"
    + (f" · left out before rating: {dropped}" if dropped else "")
)
styled = {r["model"]: r["score"] for r in (overall.get("style_control") or {}).get("data", [])}


def shown(model: str) -> str:
    """A model as people know it: its display name where its worker gives one."""
    return (metadata.get(model) or {}).get("display_name") or model


metadata = {r["model"]: r.get("metadata") or {} for r in board["data"]}
rows = [
    {
        # The API's numbers are unrounded; here they are rounded for reading.
        ("Rank (UB)" if board.get("rank_rule", "ub") == "ub" else "Rank"): r["rank"],
        "Model": shown(r["model"]),
        "Served as": r["model"],
        "Score": round(r["score"]),
        "95% CI": f"{r['ci'][0]:.0f} – {r['ci'][1]:.0f}",
        "Votes": r["votes"],
        "Online Elo": round(r["elo"]),
        **({"Style-controlled": round(styled[r["model"]])} if r["model"] in styled else {}),
        "Organization": metadata[r["model"]].get("organization", ""),
        "License": metadata[r["model"]].get("license", ""),
    }
    for r in board["data"]
]
st.dataframe(rows, hide_index=True, width="stretch")


def heatmap(matrix: list[list], title: str, value: str, fmt: str, scheme: str) -> None:
    """An A × B matrix as a heatmap whose labels stay readable from 2 models to 30: names cut to a
    length (whole in the tooltip), a row height that grows with the models, cells labelled while
    they are big enough. (Streamlit sizes the chart: a size set in the spec, or a legend below,
    collapses its rows.)"""
    names = [shown(m) for m in board["models"]]
    many = len(names) > 6
    cells = [
        {"Model A": names[i], "Model B": names[j], value: v}
        for i, row in enumerate(matrix)
        for j, v in enumerate(row)
        if v is not None
    ]
    axis = {"labelLimit": 160, "labelOverlap": False}  # every name, cut to a length
    angle = -90 if many else -40
    base = alt.Chart(alt.Data(values=cells), title=title).encode(
        x=alt.X("Model B:N", sort=names, axis=alt.Axis(orient="top", labelAngle=angle, **axis)),
        y=alt.Y("Model A:N", sort=names, axis=alt.Axis(**axis)),
    )
    squares = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme=scheme)),
        tooltip=["Model A:N", "Model B:N", alt.Tooltip(f"{value}:Q", format=fmt)],
    )
    layers = [squares]
    if len(names) <= 12:
        layers.append(base.mark_text(fontSize=11).encode(text=alt.Text(f"{value}:Q", format=fmt)))
    rows = max(260, min(900, 30 * len(names)))
    st.altair_chart(alt.layer(*layers), height=rows + 170, width="stretch")  # + the names above


tab_wins, tab_counts, tab_intervals, tab_style, tab_votes = st.tabs(
    ["Win fraction", "Battle count", "Confidence intervals", "Style control", "Votes"]
)
with tab_wins:
    heatmap(
        board["win_fraction"], "Fraction of A's wins over B (ties left out)", "win fraction", ".2f", "redblue"
    )
with tab_counts:
    heatmap(board["battle_count"], "Battles between A and B", "battles", ".0f", "blues")
with tab_intervals:
    points = [
        {"Model": shown(r["model"]), "Score": r["score"], "Low": r["ci"][0], "High": r["ci"][1]}
        for r in board["data"]
    ]
    order = [p["Model"] for p in points]
    base = alt.Chart(alt.Data(values=points)).encode(
        y=alt.Y("Model:N", sort=order, title=None, axis=alt.Axis(labelLimit=220))
    )
    intervals = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("Low:Q", scale=alt.Scale(zero=False), title="score (Elo scale) with bootstrap 95% interval"),
        x2="High:Q",
    )
    dots = base.mark_point(filled=True, size=80).encode(
        x="Score:Q", tooltip=["Model:N", alt.Tooltip("Score:Q", format=".1f"), "Low:Q", "High:Q"]
    )
    st.altair_chart(alt.layer(intervals, dots), height=max(140, 32 * len(points) + 60))

with tab_style:
    style = overall.get("style_control") or {}
    st.caption(
        "Scores with the answers' style held equal (a Bradley–Terry fit with answer length and "
        "markdown counts as features); each coefficient is that feature's pull on the vote, per "
        "standard deviation of its difference."
    )
    st.dataframe(
        [
            {
                "Model": shown(r["model"]),
                "Style-controlled": round(r["score"]),
                "95% CI": f"{r['ci'][0]:.0f} – {r['ci'][1]:.0f}",
            }
            for r in style.get("data") or []
        ],
        hide_index=True,
    )
    st.dataframe(
        [
            {"Feature": name, "Coefficient": round(value, 3)}
            for name, value in (style.get("coefficients") or {}).items()
        ],
        hide_index=True,
    )
with tab_votes:
    stats = overall.get("statistics") or {}
    st.caption(f"{stats.get('users', 0)} users")
    for title, counts in (
        ("Votes per day (UTC)", stats.get("votes_per_day") or {}),
        ("Battles per model", stats.get("battles_per_model") or {}),
        ("Votes of the busiest users", stats.get("votes_per_user") or {}),
    ):
        st.markdown(f"**{title}**")
        st.bar_chart({"count": counts}, height=220)
    outliers = overall.get("outlier_voters") or []
    st.markdown(
        "**Outlier voters** (their votes side with the ratings' favourite far less often than everyone's)"
    )
    if outliers:
        st.dataframe(outliers, hide_index=True)
    else:
        st.caption("none")
