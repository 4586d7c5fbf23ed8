"""An OpenAI-compatible chat endpoint (Corral's gateway by default, or an allowed other): the one
way the judge talks to contestants and judges. Failures are typed: an unreachable endpoint or a
refused request is an EndpointError whose message says what happened without quoting what the
endpoint answered (an upstream's body is not ours to pass on, and may echo anything)."""

from __future__ import annotations

import os
import re

import httpx

from broker.jobs import EndpointSpec
from broker.settings import Settings

# An error code worth repeating: OpenAI's are short snake_case names.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")


class EndpointError(Exception):
    pass


def resolve(endpoint: EndpointSpec, settings: Settings | None = None) -> tuple[str, str | None]:
    """(base URL, key): this Corral's gateway with the runner's internal key when base_url is
    None, else the URL with the key from the runner's environment variable `api_key_env`."""
    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if endpoint.base_url is not None:
        return endpoint.base_url.rstrip("/"), key
    settings = settings or Settings()
    internal = settings.internal_key.get_secret_value() if settings.internal_key else None
    return f"{settings.own_gateway_url}/v1", key or internal


class ChatClient:
    def __init__(self, endpoint: EndpointSpec, settings: Settings | None = None) -> None:
        self.endpoint = endpoint
        self.base_url, key = resolve(endpoint, settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(endpoint.timeout_s, connect=5),
            follow_redirects=False,
        )

    async def chat(
        self,
        model: str,
        messages: list[dict],
        temperature: float,
        max_tokens: int,
        n: int = 1,
        response_format: dict | None = None,
    ) -> list[str]:
        body = {
            **self.endpoint.extra_body,
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "n": n,
        }
        if response_format is not None:
            body["response_format"] = response_format
        try:
            response = await self.http.post("/chat/completions", json=body)
        except httpx.TransportError as e:
            raise EndpointError(f"cannot reach {self.base_url} ({type(e).__name__})") from None
        if response.status_code >= 400:
            raise EndpointError(f"{self.base_url} answered {response.status_code}{_code_of(response)}")
        try:
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            return [c["message"]["content"] or "" for c in choices]
        except (ValueError, KeyError, TypeError):
            raise EndpointError(f"{self.base_url} answered something that is not a chat completion") from None

    async def aclose(self) -> None:
        await self.http.aclose()


def _code_of(response: httpx.Response) -> str:
    """The error's code (`model_not_found`), if it has a plausible one; never its message."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" ({code})" if isinstance(code, str) and _CODE.fullmatch(code) else ""
