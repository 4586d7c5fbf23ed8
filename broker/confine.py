"""What a job created over the API may name: files inside CORRAL_HOME and the folders an admin
allows, uploaded files by id, and endpoints that are this Corral's gateway or an allowed base
URL; and bounds on every count. The CLI on the server is trusted and skips all of this.

Every refusal is a `NotAllowed` naming the parameter, never echoing the value or saying whether
a path exists (so the API cannot be used to probe the file system)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from broker.jobs import AnswerParams, CleanParams, EndpointSpec, JudgmentParams, TrainParams
from broker.settings import Settings

# An uploaded file's id, as POST /v1/files hands it out.
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
# A model or tokenizer named without a path: a built-in or a served name.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NotAllowed(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"


def roots(settings: Settings) -> list[Path]:
    return [settings.home.resolve(), *(Path(p).expanduser().resolve() for p in settings.allowed_paths)]


def files_dir(settings: Settings) -> Path:
    return settings.home / "files"


def uploaded_path(settings: Settings, file_id: str) -> Path | None:
    """The stored file of an upload id (its folder holds the one file, under its own name)."""
    folder = files_dir(settings) / file_id
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    return found[0] if found else None


def confine(value: str, settings: Settings, param: str) -> str:
    """An uploaded file's id or a path inside the allowed roots, as an absolute path with every
    symlink and `..` resolved; anything else is NotAllowed."""
    if FILE_ID.fullmatch(value):
        path = uploaded_path(settings, value)
        if path is None:
            raise NotAllowed(param, "no uploaded file has this id")
        return str(path.resolve())
    if "\x00" in value or len(value) > 4096:
        raise NotAllowed(param, "not a path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = settings.home / path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots(settings)):
        raise NotAllowed(
            param,
            "not an uploaded file id, nor a path inside CORRAL_HOME or a folder the admin allows "
            "(CORRAL_ALLOWED_PATHS)",
        )
    return str(resolved)


def _model(value: str, settings: Settings, param: str) -> str:
    """A model or tokenizer: a plain name (built-in or served), or a confined folder."""
    return value if _PLAIN_NAME.fullmatch(value) else confine(value, settings, param)


def check_endpoint(endpoint: EndpointSpec, settings: Settings, param: str) -> None:
    """None is this Corral's own gateway; any other base URL must start with an allowed one."""
    if endpoint.base_url is None:
        return
    url = urlsplit(endpoint.base_url)
    odd_path = any(part in (".", "..") for part in url.path.split("/")) or "%" in url.path
    if (
        url.scheme not in ("http", "https")
        or url.query
        or url.fragment
        or url.username
        or url.password
        or odd_path
        or "\\" in endpoint.base_url
    ):
        raise NotAllowed(f"{param}.base_url", "must be a plain http(s) base URL")
    normal = endpoint.base_url.rstrip("/") + "/"
    if not any(normal.startswith(allowed.rstrip("/") + "/") for allowed in settings.allowed_endpoints):
        raise NotAllowed(
            f"{param}.base_url",
            "not an allowed endpoint: leave it out to use this Corral's models, "
            "or ask the admin to add it to CORRAL_ALLOWED_ENDPOINTS",
        )


def _at_most(value: float | int | None, limit: float | int, param: str) -> None:
    if value is not None and value > limit:
        raise NotAllowed(param, f"at most {limit} on this server")


def check_job(kind: str, params: BaseModel, settings: Settings) -> BaseModel:
    """The params of a job created over the API, with paths resolved; raises NotAllowed."""
    update: dict[str, Any] = {}
    if isinstance(params, CleanParams):
        _at_most(len(params.inputs), settings.job_max_inputs, "params.inputs")
        _at_most(len(params.steps), 64, "params.steps")
        update["inputs"] = [confine(v, settings, f"params.inputs.{i}") for i, v in enumerate(params.inputs)]
        if params.tokenizer:
            update["tokenizer"] = _model(params.tokenizer, settings, "params.tokenizer")
    elif isinstance(params, TrainParams):
        _at_most(len(params.data) + len(params.eval_data), settings.job_max_inputs, "params.data")
        _at_most(params.max_steps, settings.job_max_steps, "params.max_steps")
        _at_most(params.epochs, settings.job_max_epochs, "params.epochs")
        _at_most(params.batch_size, settings.job_max_batch_size, "params.batch_size")
        _at_most(params.global_batch_size, settings.job_max_batch_size * 64, "params.global_batch_size")
        _at_most(params.max_length, settings.job_max_length, "params.max_length")
        _at_most(params.lora_r, 1024, "params.lora_r")
        _at_most(params.save_total_limit, 10, "params.save_total_limit")
        update["model"] = _model(params.model, settings, "params.model")
        update["data"] = [confine(v, settings, f"params.data.{i}") for i, v in enumerate(params.data)]
        update["eval_data"] = [
            confine(v, settings, f"params.eval_data.{i}") for i, v in enumerate(params.eval_data)
        ]
        if params.chat_template and "{" not in params.chat_template:  # a file, not template text
            update["chat_template"] = confine(params.chat_template, settings, "params.chat_template")
    elif isinstance(params, AnswerParams | JudgmentParams):
        if params.output is not None:
            raise NotAllowed(
                "params.output", "jobs created over the API write to the server's own folders; leave it out"
            )
        if params.questions not in ("mt_bench", "corral"):
            update["questions"] = confine(params.questions, settings, "params.questions")
        _at_most(len(params.models), settings.job_max_models, "params.models")
        _at_most(params.max_tokens, settings.max_tokens_limit, "params.max_tokens")
        if isinstance(params, AnswerParams):
            check_endpoint(params.endpoint, settings, "params.endpoint")
        else:
            check_endpoint(params.judge_endpoint, settings, "params.judge_endpoint")
            _at_most(len(params.wait_for), 16, "params.wait_for")
    return params.model_copy(update=update)
