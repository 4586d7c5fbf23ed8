"""Arena: two anonymous models, one vote, then the reveal."""

import streamlit as st

from ui.battle import battle_page

st.title("Arena")
battle_page("anonymous")
