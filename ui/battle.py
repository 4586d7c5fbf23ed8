"""A battle page: one prompt, two models answering side by side, then a vote. Anonymous battles
(the Arena) name their models only after the vote; named ones (Side-by-side) let you pick."""

from __future__ import annotations

import streamlit as st

from ui.widgets import arena_ready, attempt, client, generation_params, served_models, show_text

VOTES = {
    "left": "👈 Left is better",
    "right": "👉 Right is better",
    "tie": "🤝 Tie",
    "bothbad": "👎 Both are bad",
}
SIDES = ("left", "right")


def _pick_models(key: str, locked: bool) -> list[str]:
    models = served_models()
    left, right = st.columns(2)
    chosen = [
        left.selectbox("Left model", models, index=0, key=f"{key}_left_model", disabled=locked),
        right.selectbox(
            "Right model", models, index=min(1, len(models) - 1), key=f"{key}_right_model", disabled=locked
        ),
    ]
    return chosen


def _show_turns(battle: dict | None) -> None:
    for turn in battle["turns"] if battle else []:
        for column, side in zip(st.columns(2), SIDES, strict=True):
            with column:
                show_text(st.chat_message("user"), turn["prompt"])
                show_text(st.chat_message("assistant"), turn[side])


def _stream_turn(battle_id: str, prompt: str, params: dict) -> bool:
    """Plays one turn, each side's text growing in its own column; whether it was recorded."""
    columns = st.columns(2)
    boxes = {}
    for column, side in zip(columns, SIDES, strict=True):
        with column:
            show_text(st.chat_message("user"), prompt)
            boxes[side] = st.chat_message("assistant").empty()
    texts = {side: "" for side in SIDES}
    recorded = False

    def play() -> None:
        nonlocal recorded
        for event in client().play(battle_id, prompt, **params):
            if "error" in event:
                boxes[event["side"]].error(event["error"]["message"])
            elif "text" in event:
                texts[event["side"]] += event["text"]
                show_text(boxes[event["side"]], texts[event["side"]], typing=True)
            elif event.get("done"):
                recorded = True
        for side in SIDES:
            if texts[side]:
                show_text(boxes[side], texts[side])

    attempt(play)
    return recorded


def _vote_buttons(key: str, battle: dict) -> None:
    columns = st.columns(len(VOTES))
    for column, (vote, label) in zip(columns, VOTES.items(), strict=True):
        if column.button(label, key=f"{key}_vote_{vote}", width="stretch"):
            voted = attempt(lambda v=vote: client().vote(battle["id"], v))
            if voted:
                st.session_state[key] = voted
                st.rerun()


def _reveal(battle: dict, anonymous: bool) -> None:
    names = []
    for model, info in zip(battle["models"], battle.get("model_info") or [{}, {}], strict=True):
        shown = f"**{info.get('display_name') or model}**"
        if info.get("link"):
            shown = f"[{shown}]({info['link']})"
        names.append(shown + (f" ({model})" if info.get("display_name") else ""))
    if anonymous:
        st.success(f"Model A (left): {names[0]} · Model B (right): {names[1]}")
    st.caption(f"Your vote: {VOTES[battle['vote']]}")


def battle_page(mode: str) -> None:
    key = f"battle_{mode}"
    anonymous = mode == "anonymous"
    state = st.session_state
    state.setdefault(key, None)
    battle = state[key]
    params = generation_params(key, only_changed=True)
    if battle is None and not arena_ready(served_models()):
        st.chat_input("Ask both models", key=f"{key}_prompt", disabled=True)
        return
    if anonymous:
        st.caption(
            "Two anonymous models answer each prompt. Vote for the better answer; their names "
            "are revealed after your vote."
        )
        chosen = None
    else:
        chosen = _pick_models(key, locked=battle is not None)
    if battle and not anonymous:
        st.caption(f"Left: **{battle['models'][0]}** · Right: **{battle['models'][1]}**")
    _show_turns(battle)
    voted = battle is not None and battle["vote"] is not None
    if voted:
        _reveal(battle, anonymous)
    prompt = st.chat_input("Ask both models", key=f"{key}_prompt", disabled=voted)
    if prompt:
        if battle is None:
            battle = attempt(lambda: client().new_battle(mode, chosen))
            if battle is None:
                st.stop()
            state[key] = battle
        if _stream_turn(battle["id"], prompt, params):
            state[key] = battle = attempt(lambda: client().battle(battle["id"])) or battle
    if battle is not None and battle["turns"] and not voted:
        _vote_buttons(key, battle)
    if battle is not None and st.button("🎲 New round", key=f"{key}_new"):
        state[key] = None
        st.rerun()
