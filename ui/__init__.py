"""Streamlit pages (chat, arena, leaderboard)."""
