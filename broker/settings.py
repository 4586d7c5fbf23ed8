"""One validated settings object per process: environment (CORRAL_*), .env, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", env_file=".env", extra="ignore")

    # Where Corral keeps its state: the embedded Valkey's data, converted models, job artifacts.
    home: Path = Path("~/.corral").expanduser()
    # Unset: use (or start) the embedded Valkey under `home`. Set: any Redis or Valkey URL.
    redis_url: str | None = None
    # Prefix of every Redis key; tests give each run its own so they never collide.
    key_prefix: str = "corral"

    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    # Every request carries a deadline; this is the default when the client sets no timeout.
    request_timeout_s: float = Field(600.0, gt=0)
    # Bearer keys for /v1/* (comma-separated) and/or a file of keys, one a line; none = no auth.
    api_keys: str | None = None
    api_key_file: Path | None = None
    # Per API key (or per client address without keys), across all gateways; 0 = no limit.
    rate_limit_requests_per_min: int = Field(0, ge=0)
    rate_limit_tokens_per_min: int = Field(0, ge=0)
    # Upper bound of max_tokens a client may ask for.
    max_tokens_limit: int = Field(4096, gt=0)
    # Requests waiting for a model's workers beyond which new ones get a 429; 0 = no limit.
    max_backlog: int = Field(256, ge=0)
    # Upper bound of n (choices per request).
    max_n: int = Field(8, gt=0)
    default_max_tokens: int = Field(512, gt=0)

    # Worker
    model: str = "smollm2-135m-instruct"
    # The name the model is served under; defaults to `model`.
    served_name: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps", "xpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 0 = choose from the core count (logged with the reason).
    threads: int = Field(0, ge=0)
    max_batch: int = Field(16, gt=0)
    # KV-cache budget in tokens shared by all requests in the batch; 0 = auto (on a CPU, room for
    # max_batch full-context requests within a quarter of free memory; on a GPU, from free memory).
    kv_cache_tokens: int = Field(0, ge=0)
    # Tokens one engine step may process (a long prompt is prefilled in chunks of this size);
    # 0 = auto (1024 on a CPU, where a step of 8192 tokens takes seconds; transformers' default else).
    max_batch_tokens: int = Field(0, ge=0)
    heartbeat_s: float = Field(1.0, gt=0)
    # A worker whose heartbeat key is older than this is gone: /v1/models drops it.
    worker_ttl_s: float = Field(5.0, gt=0)
    # A request whose worker dies this many times more ends with an error instead.
    max_attempts: int = Field(3, ge=1)
    # After SIGTERM, how long in-flight requests may take to finish; what is still running then
    # is handed back (left pending, with its progress) for a live worker to continue.
    drain_timeout_s: float = Field(30.0, ge=0)
    chat_template: str | None = None
    worker_id: str | None = None

    # Jobs
    # A running job's runner renews its lease this often × 3; a job whose lease lapses (its
    # runner died) is started again by a live runner, which resumes it.
    job_lease_s: float = Field(15.0, gt=0)
    # A job started this many times without ending fails instead.
    job_max_attempts: int = Field(3, ge=1)
    # How long an ended job's record is kept.
    job_keep_s: int = Field(7 * 24 * 3600, gt=0)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, home: Path) -> Path:
        return home.expanduser()

    @property
    def model_name(self) -> str:
        return self.served_name or self.model

    def with_overrides(self, **overrides: object) -> Settings:
        """A copy with CLI flags applied; flags left as None keep the environment's value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})
