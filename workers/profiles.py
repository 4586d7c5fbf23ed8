"""Served profiles: one set of weights served under another name, with its own system prompt and
sampling preset. Two profiles of one model are two arena contestants on one copy of the weights,
and how people A/B-test prompts.

A profile fills in only what the client left out: its system prompt goes first in a chat that
has none, and its sampling values replace the fields the client did not set (the gateway lists
them in `GenerationRequest.defaulted`), as vLLM does with a model's generation config. Applying
a profile twice gives what applying it once gives, so a request taken over by another worker
runs as it began.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.schemas import ChatMessage, GenerationRequest, ModelMetadata, Sampling

# A profile's sampling presets: every sampling field but the seed (broker.schemas.Sampling).
_PRESETS = tuple(name for name in Sampling.model_fields if name != "seed")


class ProfileError(ValueError):
    """A --profile that cannot be served: its spec, file or a field is wrong (named)."""


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    system: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    # What /v1/models, the arena and the leaderboard show about it.
    display_name: str | None = None
    description: str | None = None

    def metadata(self, base: ModelMetadata, base_name: str) -> ModelMetadata:
        """The base model's metadata, with this profile's own name and description."""
        described = self.description or f"{base_name} with the {self.name} profile"
        shown = self.display_name
        if shown is None:  # the base's display name and what the profile's name adds to the base's
            suffix = self.name.removeprefix(base_name).strip("-_ ") or self.name
            shown = f"{base.display_name} ({suffix})" if base.display_name else self.name
        return base.model_copy(update={"display_name": shown, "description": described})

    def apply(self, request: GenerationRequest) -> GenerationRequest:
        """The request as this profile serves it (see the module's docstring)."""
        update: dict = {}
        preset = {
            name: getattr(self, name, None) for name in _PRESETS if getattr(self, name, None) is not None
        }
        sampling = {name: value for name, value in preset.items() if name in request.defaulted}
        if sampling:
            update["sampling"] = request.sampling.model_copy(update=sampling)
        if self.max_tokens is not None and "max_new_tokens" in request.defaulted:
            update["max_new_tokens"] = self.max_tokens
        messages = request.messages
        if self.system and messages is not None and not any(m.role == "system" for m in messages):
            update["messages"] = [ChatMessage(role="system", content=self.system), *messages]
        return request.model_copy(update=update) if update else request


def default_profile(model_name: str) -> Profile:
    """The second contestant `corral up` serves beside a lone model, so the arena works at once:
    the same weights told to be brief, and sampled cooler."""
    return Profile(
        name=f"{model_name}-concise",
        system="You are a helpful assistant. Answer in at most three short sentences, plainly.",
        temperature=0.3,
        max_tokens=256,
        description=f"{model_name} with a system prompt asking for short answers, at temperature 0.3",
    )


# Profiles known by name alone (`--profile concise`), each made for the served model.
BUILTIN = {"concise": default_profile}


def profile_name(spec: str, base: str) -> str:
    """The name a --profile spec serves under: NAME of NAME=…, or `<base>-<builtin>`."""
    name, sep, _ = spec.partition("=")
    return name.strip() if sep else f"{base}-{spec.strip()}"


def parse_profiles(specs: list[str], base: str, taken: set[str]) -> dict[str, Profile]:
    """--profile strings → name → Profile: `NAME=JSON`, `NAME=FILE` (YAML or JSON), or the name
    of a built-in profile (`concise`: served as `<base>-concise`). `taken` holds the names the
    worker already serves, which a profile may not reuse."""
    profiles: dict[str, Profile] = {}
    for spec in specs:
        name, sep, body = spec.partition("=")
        name, body = name.strip(), body.strip()
        if not sep and name in BUILTIN:
            profile = BUILTIN[name](base)
        elif not sep or not name or not body:
            known = ", ".join(BUILTIN)
            raise ProfileError(f"--profile takes NAME=JSON, NAME=FILE or a built-in ({known}), got {spec!r}")
        else:
            profile = _validated(name, _read(name, body))
        if profile.name in profiles or profile.name in taken:
            raise ProfileError(f"--profile {profile.name!r}: that name is served already")
        profiles[profile.name] = profile
    return profiles


def _validated(name: str, fields: dict) -> Profile:
    try:
        return Profile.model_validate({**fields, "name": name})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ProfileError(f"--profile {name!r}: {problems}") from None


def _read(name: str, body: str) -> dict:
    if body.startswith("{"):
        text = body
    else:
        path = Path(body).expanduser()
        if not path.is_file():
            raise ProfileError(f"--profile {name!r}: {body!r} is neither a JSON object nor a file")
        text = path.read_text()
    try:
        fields = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ProfileError(f"--profile {name!r}: not valid JSON or YAML: {e}") from None
    if not isinstance(fields, dict):
        raise ProfileError(f"--profile {name!r}: a profile is a mapping of fields")
    return fields
