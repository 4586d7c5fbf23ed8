"""Side-by-side: two models you pick, answering the same prompts."""

import streamlit as st

from ui.battle import battle_page

st.title("Side-by-side")
battle_page("named")
