"""What every page shares: the gateway client, the generation settings in the sidebar, and
errors shown as messages instead of tracebacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from ui.client import APIError, Client, GatewayDown

T = TypeVar("T")


def client() -> Client:
    if "client" not in st.session_state:
        st.session_state.client = Client.from_env()
    return st.session_state.client


def attempt(action: Callable[[], T]) -> T | None:
    """Runs a call to the gateway; on failure shows why and returns None."""
    try:
        return action()
    except GatewayDown as e:
        st.error(str(e), icon="🔌")
    except APIError as e:
        st.error(str(e), icon="⚠️")
    return None


def fetch(action: Callable[[], T]) -> T:
    """Runs a call the page cannot do without; on failure shows why and stops the page."""
    result = attempt(action)
    if result is None:
        st.stop()
    return result


def served_models() -> list[str]:
    """The models with a live worker; stops the page with a message when there are none."""
    models = fetch(client().models)
    if not models:
        st.warning("No model has a live worker right now. Start one with `corral worker --model …`.")
        st.stop()
    return models


def generation_params(key: str) -> dict:
    """Temperature, top_p and max tokens, set in the sidebar."""
    with st.sidebar:
        st.subheader("Generation")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key=f"{key}_temperature")
        top_p = st.slider("Top p", 0.05, 1.0, 1.0, 0.05, key=f"{key}_top_p")
        max_tokens = st.slider("Max new tokens", 16, 2048, 512, 16, key=f"{key}_max_tokens")
    return {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
