"""An OpenAI-compatible chat endpoint (Corral's gateway by default, or any other): the one way
the judge talks to contestants and judges. Failures are typed: an unreachable endpoint or a
refused request is an EndpointError with a message a person can act on."""

from __future__ import annotations

import httpx

from broker.jobs import EndpointSpec


class EndpointError(Exception):
    pass


class ChatClient:
    def __init__(self, endpoint: EndpointSpec) -> None:
        self.endpoint = endpoint
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self.http = httpx.AsyncClient(
            base_url=endpoint.base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(endpoint.timeout_s, connect=5),
        )  # fmt: skip

    async def chat(self, model: str, messages: list[dict], temperature: float, max_tokens: int, n: int = 1
                   ) -> list[str]:  # fmt: skip
        body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                "n": n, **self.endpoint.extra_body}  # fmt: skip
        try:
            response = await self.http.post("/chat/completions", json=body)
        except httpx.TransportError as e:
            raise EndpointError(f"cannot reach {self.endpoint.base_url}: {type(e).__name__} {e}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise EndpointError(f"{self.endpoint.base_url} answered {response.status_code}: {message}")
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return [c["message"]["content"] or "" for c in choices]

    async def aclose(self) -> None:
        await self.http.aclose()
