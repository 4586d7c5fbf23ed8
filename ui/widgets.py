"""What every page shares: the gateway client, the generation settings in the sidebar, and
errors shown as messages instead of tracebacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from ui.client import APIError, Client, GatewayDown

T = TypeVar("T")


def keep_line_breaks(text: str) -> str:
    """Markdown for text a model wrote, with every line break it wrote shown: Markdown joins
    single newlines into one paragraph ("1.1 …\n1.2 …" becomes one line), so lines outside code
    fences and tables end with a hard break. Code blocks, lists and tables are left as written."""
    lines = text.split("\n")
    fenced = False
    out = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
            out.append(line)
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        plain = not fenced and stripped and following and not stripped.startswith("|")
        out.append(line + "  " if plain and not line.endswith("  ") else line)
    return "\n".join(out)


def show_text(box, text: str, typing: bool = False) -> None:
    """A model's (or a person's) text in a Streamlit element, line breaks kept."""
    box.markdown(keep_line_breaks(text) + (" ▌" if typing else ""))


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


# The sliders' starting values (the arena's own defaults for a turn).
DEFAULT_PARAMS = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512}


def generation_params(key: str, only_changed: bool = False) -> dict:
    """Temperature, top_p and max tokens, set in the sidebar. With `only_changed`, only the
    sliders the user moved: each model (a served profile) keeps its own preset for the rest."""
    with st.sidebar:
        st.subheader("Generation")
        if only_changed:
            st.caption("Untouched, each model uses its own preset.")
        params = {
            "temperature": st.slider(
                "Temperature", 0.0, 2.0, DEFAULT_PARAMS["temperature"], 0.05, key=f"{key}_temperature"
            ),
            "top_p": st.slider("Top p", 0.05, 1.0, DEFAULT_PARAMS["top_p"], 0.05, key=f"{key}_top_p"),
            "max_tokens": st.slider(
                "Max new tokens", 16, 2048, DEFAULT_PARAMS["max_tokens"], 16, key=f"{key}_max_tokens"
            ),
        }
    if only_changed:
        return {name: value for name, value in params.items() if value != DEFAULT_PARAMS[name]}
    return params


def arena_ready(models: list[str]) -> bool:
    """Whether two models are served for a battle; if not, says so and what to run."""
    if len(models) >= 2:
        return True
    st.warning(
        f"A battle needs two served models; only **{models[0]}** is served now. Serve another, then "
        "reload this page:\n\n"
        "- `corral up` serves a second contestant by default (a concise profile of the same model), "
        "unless it was started with `--no-profile`;\n"
        "- `corral up --model A --model B` serves two models;\n"
        "- or, beside a running Corral: `corral worker --model B` "
        "(or `corral worker --model A --served-name A-2 --profile …`).",
        icon="⚔️",
    )
    return False
