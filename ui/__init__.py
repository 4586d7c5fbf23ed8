"""Streamlit pages (chat, arena, leaderboard). Not built yet: see the Streamlit issue."""
