"""The Streamlit pages (AppTest, in-process) against a running gateway and real workers, and one
browser test: Playwright driving Debian's Chromium through an arena battle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import HOME, MODEL, MODEL_INFO, TWIN, TWIN_INFO, free_port
from tests.helpers import PAGES, wait_for_ui
from ui.widgets import keep_line_breaks

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
    assert messages[1].markdown[0].value == keep_line_breaks(expected)

    before = httpx.get(f"{gateway_env.url}/v1/arena/export", params={"include": "votes"}, timeout=10).text
    app.button(key="chat_up").click().run()
    assert not app.exception and not app.error
    after = httpx.get(f"{gateway_env.url}/v1/arena/export", params={"include": "votes"}, timeout=10).text
    assert after.count('"upvote"') == before.count('"upvote"') + 1

    app.button(key="chat_regenerate").click().run()
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    assert app.chat_message[1].markdown[0].value == keep_line_breaks(expected)  # greedy: the same again
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
        with httpx.stream(
            "POST",
            f"{url}/v1/arena/battles/{battle['id']}/turns",
            json={"content": "Hi", "max_tokens": 2},
            timeout=60,
        ) as r:
            r.read()
        httpx.post(f"{url}/v1/arena/battles/{battle['id']}/vote", json={"vote": choice}, timeout=10)
    app = page("leaderboard").run()
    assert not app.exception
    app.button(key="leaderboard_refresh").click().run()
    assert not app.exception and not app.warning
    table = app.dataframe[0].value
    assert sorted(table["Model"]) == sorted([MODEL_INFO["display_name"], TWIN_INFO["display_name"]])
    assert sorted(table["Served as"]) == sorted([MODEL, TWIN])
    assert list(table.columns) == [
        "Rank (UB)",
        "Model",
        "Served as",
        "Score",
        "95% CI",
        "Votes",
        "Online Elo",
        "Style-controlled",
        "Organization",
        "License",
    ]
    assert set(table["Organization"]) == {"HuggingFace (SmolLM2)", "Corral tests"}
    charts = app.get("vega_lite_chart")
    assert len(charts) == 3 + 3  # two heatmaps and the intervals; votes per day, model and user
    assert MODEL_INFO["display_name"] in charts[0].proto.spec  # the heatmaps name models as people know them


def test_pages_say_clearly_when_the_gateway_is_down(monkeypatch):
    monkeypatch.setenv("CORRAL_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("chat", "arena", "side_by_side", "leaderboard", "judge"):
        app = page(name).run()
        assert not app.exception, name
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
        assert "No model has a live worker" in arena.warning[0].value  # said before anyone types
    finally:
        stack.stop()


def test_the_arena_says_what_it_needs_before_anyone_types_when_one_model_is_served(stack, monkeypatch):
    monkeypatch.setenv("CORRAL_GATEWAY_URL", stack.url)
    for name, key in (("arena", "battle_anonymous_prompt"), ("side_by_side", "battle_named_prompt")):
        app = page(name).run()
        assert not app.exception and not app.error, name
        warning = app.warning[0].value
        assert f"only **{MODEL}** is served" in warning and "corral up --model A --model B" in warning, name
        assert app.chat_input(key=key).proto.disabled, name


# --------------------------------------------------------------------------- a real browser

CHROMIUM = "/usr/bin/chromium"


def screenshots_folder() -> Path:
    """Where the browser test saves its screenshots (kept after the run, as test artifacts)."""
    folder = Path(os.environ.get("CORRAL_TEST_ARTIFACTS", Path(__file__).parent.parent / ".artifacts")) / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def set_slider_to_minimum(tab, label: str) -> None:
    slider = tab.locator('[data-testid="stSlider"]').filter(has_text=label).get_by_role("slider")
    slider.focus()
    slider.press("Home")


def test_a_browser_after_corral_up_chats_plays_the_arena_and_reads_the_leaderboard(
    tmp_path, model_path, capsys
):
    """A new user's first hour, in Chromium, on what `corral up` starts with no flags: the first
    page, a chat reply with its line breaks, an arena round between the two default contestants
    with their names revealed after the vote, the leaderboard by display names; then
    `corral status` and `corral stop`. Screenshots of each page are kept."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Debian's Chromium at {CHROMIUM} (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(HOME / "models")  # the converted model, not the conversion
    port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    # fp32: the chat reply is compared with the API's greedy answer.
    env.update(
        CORRAL_HOME=str(home),
        CORRAL_PORT=str(port),
        CORRAL_UI_PORT=str(ui_port),
        CORRAL_THREADS="1",
        CORRAL_DTYPE="float32",
        CORRAL_KV_CACHE_TOKENS="8192",
    )
    api = f"http://127.0.0.1:{port}/v1"
    shots = screenshots_folder()
    with capsys.disabled():
        print(f"\nbrowser test screenshots: {shots}")
    up = subprocess.Popen([sys.executable, "-m", "corral", "up"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        while "Corral is up" not in (line := up.stdout.readline()):
            assert line, "corral up ended before it was up"
        assert f"{MODEL}, {MODEL}-concise" in line  # two contestants, no flags needed
        wait_for_ui(f"http://127.0.0.1:{ui_port}")
        poem = [{"role": "user", "content": "Write a short poem about the sea."}]
        greedy = httpx.post(
            f"{api}/chat/completions",
            timeout=120,
            json={
                "model": MODEL,
                "messages": poem,
                "temperature": 0,
                "top_p": 1,
                "max_tokens": 16,
            },
        ).json()["choices"][0]["message"]["content"]
        lines = [line.strip() for line in greedy.splitlines() if line.strip()]
        assert len(lines) >= 2, greedy  # a reply with a line break in it
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(f"http://127.0.0.1:{ui_port}/")
            expect(tab.get_by_role("heading", name="Chat")).to_be_visible(timeout=60_000)
            expect(tab.get_by_role("button", name="Deploy")).to_have_count(0)  # no developer chrome
            assert tab.title().endswith("Corral") or "Corral" in tab.title()
            tab.screenshot(path=str(shots / "1-chat.png"), full_page=True)

            set_slider_to_minimum(tab, "Temperature")
            set_slider_to_minimum(tab, "Max new tokens")
            prompt = tab.get_by_placeholder("Say something")
            prompt.fill(poem[0]["content"])
            prompt.press("Enter")
            reply = tab.locator('[data-testid="stChatMessage"]').nth(1)
            expect(tab.get_by_role("button", name="🔄 Regenerate")).to_be_enabled(timeout=120_000)
            shown = [line.strip() for line in reply.inner_text().splitlines() if line.strip()]
            assert shown[-len(lines) :] == lines  # each line the model wrote is a line on the page
            tab.screenshot(path=str(shots / "2-chat-reply.png"), full_page=True)

            tab.goto(f"http://127.0.0.1:{ui_port}/arena")
            prompt = tab.get_by_placeholder("Ask both models")
            prompt.fill("Name one fruit.")
            prompt.press("Enter")
            left = tab.get_by_role("button", name="👈 Left is better")
            expect(left).to_be_visible(timeout=TIMEOUT_S * 1000)
            left.click()
            revealed = tab.get_by_text("Model A (left)")
            expect(revealed).to_be_visible(timeout=30_000)
            names = revealed.inner_text()
            assert "SmolLM2-135M-Instruct (concise)" in names and f"({MODEL})" in names, names
            tab.screenshot(path=str(shots / "3-arena.png"), full_page=True)

            tab.goto(f"http://127.0.0.1:{ui_port}/leaderboard")
            tab.get_by_role("button", name="🔄 Recompute now").click()
            expect(tab.get_by_text("bootstrap rounds")).to_be_visible(timeout=90_000)
            board = httpx.get(f"{api}/leaderboard", timeout=10).json()
            assert {r["metadata"]["display_name"] for r in board["data"]} == {
                "SmolLM2-135M-Instruct",
                "SmolLM2-135M-Instruct (concise)",
            }
            # The board is the first table; the page's tabs hold more.
            expect(tab.locator('[data-testid="stDataFrame"]').first).to_be_visible()
            expect(tab.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible()
            tab.screenshot(path=str(shots / "4-leaderboard.png"), full_page=True)
            browser.close()
        for name in ("1-chat", "2-chat-reply", "3-arena", "4-leaderboard"):
            assert (shots / f"{name}.png").stat().st_size > 10_000, name

        status = subprocess.run(
            [sys.executable, "-m", "corral", "status"], env=env, capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert api in status.stdout and f"{MODEL}-concise" in status.stdout and "stop" in status.stdout
        stop = subprocess.run(
            [sys.executable, "-m", "corral", "stop"], env=env, capture_output=True, text=True, timeout=90
        )
        assert stop.returncode == 0 and "Corral stopped." in stop.stdout, stop.stdout + stop.stderr
        assert up.wait(timeout=10) == 0
        gone = subprocess.run(
            [sys.executable, "-m", "corral", "status"], env=env, capture_output=True, text=True, timeout=30
        )
        assert gone.returncode == 1 and "not running" in gone.stdout
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
