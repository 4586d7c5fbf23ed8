"""The Streamlit pages (AppTest, in-process) against a running gateway and real workers, and one
browser test: Playwright driving Debian's Chromium through an arena battle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import MODEL, TWIN, free_port, wait_until_ok

PAGES = Path(__file__).parent.parent / "ui" / "views"
TIMEOUT_S = 120


@pytest.fixture
def gateway_env(arena_stack, monkeypatch):
    monkeypatch.setenv("CORRAL_GATEWAY_URL", arena_stack.url)
    return arena_stack


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=TIMEOUT_S)


def all_text(app: AppTest) -> str:
    parts = [m.value for m in app.markdown] + [s.value for s in app.success] + [c.value for c in app.caption]
    return "\n".join(parts)


def test_chat_page_streams_a_reply_and_records_a_vote(gateway_env, greedy):
    app = page("chat").run()
    assert not app.exception
    assert app.selectbox(key="chat_model").options == sorted([MODEL, TWIN])
    app.selectbox(key="chat_model").set_value(MODEL)
    app.slider(key="chat_temperature").set_value(0.0)
    app.slider(key="chat_max_tokens").set_value(16)
    app.chat_input(key="chat_prompt").set_value("What is the capital of France?").run()
    assert not app.exception
    messages = app.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    expected, _, _ = greedy([{"role": "user", "content": "What is the capital of France?"}], 16)
    assert messages[1].markdown[0].value == expected

    before = httpx.get(f"{gateway_env.url}/v1/arena/export", params={"include": "votes"}, timeout=10).text
    app.button(key="chat_up").click().run()
    assert not app.exception and not app.error
    after = httpx.get(f"{gateway_env.url}/v1/arena/export", params={"include": "votes"}, timeout=10).text
    assert after.count('"upvote"') == before.count('"upvote"') + 1

    app.button(key="chat_regenerate").click().run()
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.chat_message[1].markdown[0].value == expected  # greedy: the same answer again
    app.button(key="chat_clear").click().run()
    assert len(app.chat_message) == 0


def test_arena_page_streams_two_answers_and_reveals_the_models_after_the_vote(gateway_env):
    app = page("arena").run()
    assert not app.exception
    app.slider(key="battle_anonymous_max_tokens").set_value(16)
    app.chat_input(key="battle_anonymous_prompt").set_value("Tell me a fun fact.").run()
    assert not app.exception and not app.error
    assert MODEL not in all_text(app)  # anonymous until the vote
    assert len([m for m in app.chat_message if m.name == "assistant"]) == 2

    app.button(key="battle_anonymous_vote_left").click().run()
    assert not app.exception and not app.error
    revealed = app.success[0].value
    assert MODEL in revealed and TWIN in revealed
    assert app.session_state["battle_anonymous"]["vote"] == "left"

    app.button(key="battle_anonymous_new").click().run()
    assert app.session_state["battle_anonymous"] is None


def test_side_by_side_page_battles_the_two_models_picked(gateway_env):
    app = page("side_by_side").run()
    assert not app.exception
    app.selectbox(key="battle_named_left_model").set_value(TWIN)
    app.selectbox(key="battle_named_right_model").set_value(MODEL)
    app.slider(key="battle_named_max_tokens").set_value(16)
    app.chat_input(key="battle_named_prompt").set_value("Say hello.").run()
    assert not app.exception and not app.error
    battle = app.session_state["battle_named"]
    assert battle["models"] == [TWIN, MODEL] and len(battle["turns"]) == 1
    app.button(key="battle_named_vote_tie").click().run()
    assert app.session_state["battle_named"]["vote"] == "tie"


def test_leaderboard_page_recomputes_and_shows_the_table_and_plots(gateway_env):
    url = gateway_env.url
    for choice in ("left", "right"):
        battle = httpx.post(f"{url}/v1/arena/battles", json={}, timeout=10).json()
        with httpx.stream("POST", f"{url}/v1/arena/battles/{battle['id']}/turns",
                          json={"content": "Hi", "max_tokens": 2}, timeout=60) as r:  # fmt: skip
            r.read()
        httpx.post(f"{url}/v1/arena/battles/{battle['id']}/vote", json={"vote": choice}, timeout=10)
    app = page("leaderboard").run()
    assert not app.exception
    app.button(key="leaderboard_refresh").click().run()
    assert not app.exception and not app.warning
    table = app.dataframe[0].value
    assert sorted(table["Model"]) == sorted([MODEL, TWIN])
    assert list(table.columns) == [
        "Rank", "Model", "Score", "95% CI", "Votes", "Online Elo", "Organization", "License",
    ]  # fmt: skip
    assert set(table["Organization"]) == {"HuggingFace (SmolLM2)", "Corral tests"}
    assert len(app.get("image")) == 3  # two heatmaps and the interval plot


def test_pages_say_clearly_when_the_gateway_is_down(monkeypatch):
    monkeypatch.setenv("CORRAL_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("chat", "arena", "side_by_side", "leaderboard", "judge"):
        app = page(name).run()
        assert not app.exception, name
        if name == "arena":  # it asks for nothing until the first prompt
            app.chat_input(key="battle_anonymous_prompt").set_value("hi").run()
        assert "is not reachable" in app.error[0].value, name


def test_chat_page_says_when_no_model_is_served(redis_url, monkeypatch):
    from tests.conftest import Stack

    stack = Stack(redis_url, f"test-empty-{os.getpid()}-{time.monotonic_ns()}", free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        monkeypatch.setenv("CORRAL_GATEWAY_URL", stack.url)
        app = page("chat").run()
        assert "No model has a live worker" in app.warning[0].value
        arena = page("arena").run()
        arena.chat_input(key="battle_anonymous_prompt").set_value("hi").run()
        assert "needs two models" in arena.error[0].value
    finally:
        stack.stop()


# --------------------------------------------------------------------------- a real browser

CHROMIUM = "/usr/bin/chromium"


def test_browser_plays_an_arena_battle_and_votes(arena_stack, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Debian's Chromium at {CHROMIUM} (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    env = dict(os.environ, CORRAL_GATEWAY_URL=arena_stack.url)
    ui = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PAGES.parent / "app.py"), "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_ui(f"http://127.0.0.1:{port}")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(f"http://127.0.0.1:{port}/arena")
            prompt = tab.get_by_placeholder("Ask both models")
            prompt.fill("Write one short sentence about cats.")
            prompt.press("Enter")
            left = tab.get_by_role("button", name="👈 Left is better")
            expect(left).to_be_visible(timeout=TIMEOUT_S * 1000)
            left.click()
            expect(tab.get_by_text("Model A (left)")).to_be_visible(timeout=30_000)
            revealed = tab.get_by_text("Model A (left)").inner_text()
            assert MODEL in revealed and TWIN in revealed
            shot = tmp_path / "arena.png"
            tab.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if keep := os.environ.get("CORRAL_TEST_SCREENSHOTS"):
                shutil.copy(shot, keep)
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=20)


def wait_for_ui(url: str) -> None:
    wait_until_ok(f"{url}/_stcore/health")
