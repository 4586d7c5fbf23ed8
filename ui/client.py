"""The UI's one way to Corral: the gateway's HTTP API (never Redis), with its errors turned into
two exceptions the pages can show as they are."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class GatewayDown(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"The gateway at {url} is not reachable. Start Corral with `corral up` (or set "
            f"CORRAL_GATEWAY_URL to where it runs) and reload this page."
        )


class APIError(Exception):
    """An error the gateway answered with (OpenAI's error body): its message is for people."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error(status: int, body: bytes) -> APIError:
    try:
        error = json.loads(body)["error"]
        return APIError(status, error["message"], error.get("code"))
    except (ValueError, KeyError, TypeError):
        return APIError(status, f"the gateway answered {status}: {body[:200].decode(errors='replace')}")


def _sse(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event and "side" not in event:
            raise APIError(500, event["error"]["message"], event["error"].get("code"))
        yield event


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=3)
        )

    @classmethod
    def from_env(cls) -> Client:
        return cls(os.environ.get("CORRAL_GATEWAY_URL", DEFAULT_URL), os.environ.get("CORRAL_API_KEY"))

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError:
            raise GatewayDown(self.url) from None
        if response.status_code >= 400:
            raise _error(response.status_code, response.content)
        return response.json()

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, response.read())
                yield from _sse(response)
        except httpx.TransportError:
            raise GatewayDown(self.url) from None

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def chat(self, model: str, messages: list[dict], **params) -> Iterator[str]:
        """The reply's text deltas as they stream."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        for chunk in self._stream("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                if text := choice["delta"].get("content"):
                    yield text

    def feedback(self, model: str, messages: list[dict], vote: str, chat_id: str) -> dict:
        body = {"model": model, "messages": messages, "vote": vote, "chat_id": chat_id}
        return self._request("POST", "/v1/arena/feedback", json=body)

    def new_battle(self, mode: str, models: list[str] | None = None) -> dict:
        body = {"mode": mode} | ({"models": models} if models else {})
        return self._request("POST", "/v1/arena/battles", json=body)

    def battle(self, battle_id: str) -> dict:
        return self._request("GET", f"/v1/arena/battles/{battle_id}")

    def play(self, battle_id: str, content: str, **params) -> Iterator[dict]:
        """A battle turn's events: {"side", "text"}, {"side", "finish_reason"}, {"side", "error"},
        then {"turn", "done"}."""
        yield from self._stream(f"/v1/arena/battles/{battle_id}/turns", {"content": content, **params})

    def vote(self, battle_id: str, vote: str) -> dict:
        return self._request("POST", f"/v1/arena/battles/{battle_id}/vote", json={"vote": vote})

    def leaderboard(self, category: str = "overall") -> dict:
        return self._request("GET", "/v1/leaderboard", params={"category": category})

    def refresh_leaderboard(self) -> dict:
        return self._request("POST", "/v1/leaderboard/refresh")

    def judge_runs(self) -> list[dict]:
        return self._request("GET", "/v1/judge/results")["data"]

    def judge_run(self, name: str) -> dict:
        return self._request("GET", f"/v1/judge/results/{name}")

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}")
