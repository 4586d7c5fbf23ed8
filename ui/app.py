"""Corral's web UI: `streamlit run ui/app.py` (corral up starts it). A thin client of the
gateway at CORRAL_GATEWAY_URL."""

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).parent / "views"

st.set_page_config(page_title="Corral", page_icon="🐎", layout="wide")
navigation = st.navigation(
    [
        st.Page(PAGES / "chat.py", title="Chat", icon="💬", default=True),
        st.Page(PAGES / "arena.py", title="Arena", icon="⚔️"),
        st.Page(PAGES / "side_by_side.py", title="Side-by-side", icon="👥"),
        st.Page(PAGES / "leaderboard.py", title="Leaderboard", icon="🏆"),
        st.Page(PAGES / "judge.py", title="Judge results", icon="⚖️"),
    ]
)
navigation.run()
