"""Chat with one model: streaming replies, regenerate, clear, and up/down/flag votes."""

from __future__ import annotations

import uuid

import streamlit as st

from ui.widgets import attempt, client, generation_params, served_models, show_text

st.title("Chat")
models = served_models()
model = st.selectbox("Model", models, key="chat_model")
params = generation_params("chat")
state = st.session_state
state.setdefault("chat_messages", [])
state.setdefault("chat_id", uuid.uuid4().hex)
state.setdefault("chat_regenerate_now", False)


def reply() -> None:
    """Streams the model's answer to the conversation so far into a new assistant message."""
    box = st.chat_message("assistant").empty()
    shown = ""

    def stream() -> str:
        nonlocal shown
        for piece in client().chat(model, state.chat_messages, **params):
            shown += piece
            show_text(box, shown, typing=True)
        show_text(box, shown)
        return shown

    text = attempt(stream)
    if text:
        state.chat_messages.append({"role": "assistant", "content": text})


for message in state.chat_messages:
    show_text(st.chat_message(message["role"]), message["content"])

if state.chat_regenerate_now:
    state.chat_regenerate_now = False
    reply()

if prompt := st.chat_input("Say something", key="chat_prompt"):
    state.chat_messages.append({"role": "user", "content": prompt})
    show_text(st.chat_message("user"), prompt)
    reply()

if state.chat_messages:
    answered = state.chat_messages[-1]["role"] == "assistant"
    columns = st.columns(5)
    votes = {"up": "👍 Upvote", "down": "👎 Downvote", "flag": "⚠️ Flag"}
    for column, (vote, label) in zip(columns, votes.items(), strict=False):
        clicked = column.button(label, key=f"chat_{vote}", disabled=not answered)
        if clicked and attempt(
            lambda v=vote: client().feedback(model, state.chat_messages, v, state.chat_id)
        ):
            st.toast("Thanks, your vote is recorded.")
    if columns[3].button("🔄 Regenerate", key="chat_regenerate", disabled=not answered):
        state.chat_messages.pop()
        state.chat_regenerate_now = True
        st.rerun()
    if columns[4].button("🗑️ Clear", key="chat_clear"):
        state.chat_messages = []
        state.chat_id = uuid.uuid4().hex
        st.rerun()
