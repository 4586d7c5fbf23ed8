"""One validated settings object per process: environment (CORRAL_*), .env, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", env_file=".env", extra="ignore")

    # Where Corral keeps its state: the embedded Valkey's data, converted models, job artifacts.
    home: Path = Path("~/.corral").expanduser()
    # Unset: use (or start) the embedded Valkey under `home`. Set: any Redis or Valkey URL.
    redis_url: str | None = None
    # The job queue's Redis (arq's queue and the job records), when it is not `redis_url`'s: arq
    # cannot use a Redis Cluster, so on a cluster this names a single server (or a Sentinel-
    # managed one: `redis+sentinel://`... is not accepted by arq either, so a plain URL).
    jobs_redis_url: str | None = None
    # The embedded Valkey's port on 127.0.0.1 (None: a free one, chosen when it starts).
    valkey_port: int | None = Field(None, gt=0, lt=65536)
    # Prefix of every Redis key; tests give each run its own so they never collide.
    key_prefix: str = "corral"

    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    # Every request carries a deadline; this is the default when the client sets no timeout.
    request_timeout_s: float = Field(600.0, gt=0)
    # While Redis (or the shard of a model's queue) is unreachable, how long the gateway keeps
    # trying to queue a request before it answers 503: longer than a failover. Within the
    # request's deadline in any case.
    admission_retry_s: float = Field(10.0, ge=0)
    # Bearer keys for /v1/* (comma-separated): user keys, and admin keys that may also run jobs,
    # export the arena and refresh the leaderboard. A key file holds one key a line, optionally
    # followed by its role (`KEY admin`; default user). No keys at all: the gateway serves only on
    # loopback, where every caller is an admin (one person's machine), unless `insecure` is set.
    api_keys: str | None = None
    admin_keys: str | None = None
    api_key_file: Path | None = None
    # A user key that Corral's own processes use to reach the gateway (the UI, the judge's calls,
    # `corral up`'s readiness probe); `corral up` generates one when keys are on.
    internal_key: SecretStr | None = None
    # Serve on a non-loopback address without keys (every caller is then a user; no admin).
    insecure: bool = False
    # Largest request body, and characters of prompt text a request may carry (counted before
    # anything is tokenized, so a huge prompt costs a length check, not a tokenizer run).
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    max_input_chars: int = Field(256_000, gt=0)
    # Largest file `POST /v1/files` accepts (streamed to CORRAL_HOME/files).
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0)
    # Per API key (or per client address without keys), across all gateways; 0 = no limit.
    rate_limit_requests_per_min: int = Field(0, ge=0)
    rate_limit_tokens_per_min: int = Field(0, ge=0)
    # The limits' fixed window ("per minute" is per window when this is changed; tests widen it
    # so that a burst never straddles two windows).
    rate_limit_window_s: int = Field(60, gt=0)
    # Upper bound of max_tokens a client may ask for.
    max_tokens_limit: int = Field(4096, gt=0)
    # Requests waiting for a model's workers beyond which new ones get a 429; 0 = no limit.
    max_backlog: int = Field(256, ge=0)
    # Upper bound of n (choices per request).
    max_n: int = Field(8, gt=0)
    default_max_tokens: int = Field(512, gt=0)

    # Web UI (`corral ui`, started by `corral up`): its port, and where it finds the gateway
    # (default http://HOST:PORT). The UI reads CORRAL_GATEWAY_URL and CORRAL_API_KEY itself.
    ui_port: int = 8501
    gateway_url: str | None = None

    # Worker
    model: str = "smollm2-135m-instruct"
    # The name the model is served under; defaults to `model`.
    served_name: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps", "xpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 0 = choose from the core count (logged with the reason).
    threads: int = Field(0, ge=0)
    # Requests decoded together (an API-backed worker: upstream calls open at once).
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
    # How long a worker keeps sending a request's events that reach no gateway (sent, and nobody
    # subscribed) before it takes the client for gone and cancels the request. Longer than a
    # Redis failover, during which a gateway resubscribes; events that could not be sent at all
    # (their shard unreachable) are kept and do not count.
    unheard_grace_s: float = Field(30.0, gt=0)
    # A request whose worker dies this many times more ends with an error instead.
    max_attempts: int = Field(3, ge=1)
    # After SIGTERM, how long in-flight requests may take to finish; what is still running then
    # is handed back (left pending, with its progress) for a live worker to continue.
    drain_timeout_s: float = Field(30.0, ge=0)
    # A worker whose engine has had work and made no step this long takes it for dead: it hands
    # its requests back and exits (status 3) for its supervisor to start it again.
    engine_stall_s: float = Field(120.0, gt=0)
    # Tests only: SIGUSR2 makes the engine's thread die at its next step.
    fault_injection: bool = False
    # While other requests decode, the prompt tokens one engine step may take (a long prompt is
    # read in slices between their tokens, so their streams never freeze); None = auto (128 on a
    # CPU, chosen with bench/prefill.py; 512 on a GPU), 0 = no bound.
    prefill_tokens_while_decoding: int | None = Field(None, ge=0)
    # Each token's numbers independent of what shares its engine steps: greedy text equal alone
    # and in any batch, however its prompt was chunked or cached, and across a takeover
    # (workers/invariant.py). It costs throughput (docs/decisions.md), hence off by default.
    batch_invariant: bool = False
    chat_template: str | None = None
    # How the model writes tool calls (workers/tools.py): hermes, llama3_json or mistral; unset:
    # read off the chat template (Hermes when it shows no format).
    tool_parser: Literal["hermes", "llama3_json", "mistral"] | None = None
    # LoRA adapters served beside the model on one copy of its weights: NAME=PATH each (a peft
    # adapter folder), each served as model NAME; from the environment, a JSON list.
    lora: list[str] = Field(default_factory=list)
    # Profiles: the model's weights served under more names, each with its own system prompt and
    # sampling preset, NAME=JSON or NAME=FILE (YAML) each; from the environment, a JSON list.
    profiles: list[str] = Field(default_factory=list)
    worker_id: str | None = None
    # Weights quantized on load by bitsandbytes (the `quant` extra); both work on a CPU too.
    load_8bit: bool = False
    load_4bit: bool = False
    # Spread the weights over this many GPUs (accelerate's device map), each capped at
    # max_gpu_memory (e.g. "20GiB"; default: what it has free); cpu_offloading puts what does
    # not fit in CPU memory. Both run one request at a time (see `engine`).
    num_gpus: int = Field(1, ge=1)
    max_gpu_memory: str | None = None
    cpu_offloading: bool = False
    # auto: transformers' continuous batching where it can run the model, else a one-request-at-a-
    # time decode loop (logged with the reason); continuous or generate: that one, or an error.
    engine: Literal["auto", "continuous", "generate"] = "auto"
    # What /v1/models, the arena and the leaderboard show about the served model: a YAML file
    # (served name → display_name, link, organization, license, description), and flags on top.
    model_info_file: Path | None = None
    display_name: str | None = None
    model_link: str | None = None
    organization: str | None = None
    model_license: str | None = None
    model_description: str | None = None
    # API-backed worker: with upstream_url set, the worker loads no model and forwards each
    # request to that OpenAI-compatible /v1 base URL, as model `upstream_model` (default: the
    # served name). The key is sent as a bearer token and never logged or shown.
    upstream_url: str | None = None
    upstream_model: str | None = None
    upstream_api_key: SecretStr | None = None
    # JSON merged into every upstream request body, e.g. {"reasoning_effort": "low"}.
    upstream_extra_body: dict[str, Any] = Field(default_factory=dict[str, Any])
    upstream_timeout_s: float = Field(600.0, gt=0)

    # Arena
    # Sampling weight of each model in anonymous battles (JSON: {"name": weight}); a model not
    # named weighs 1, and weight 0 keeps it out of anonymous battles.
    arena_weights: dict[str, float] = Field(default_factory=dict)
    # A prompt's length in characters, and the turns a battle may have (FastChat: 12,000 and 50).
    arena_max_input_chars: int = Field(12000, gt=0)
    arena_max_turns: int = Field(50, gt=0)
    # Votes one user (API key, or client address) may cast per clock hour; 0 = no limit.
    arena_votes_per_hour: int = Field(200, ge=0)
    # A battle nobody plays for this long is forgotten (its turns and vote stay in the log).
    arena_battle_ttl_s: int = Field(24 * 3600, gt=0)
    # The job runner recomputes the leaderboard this often when votes came in; 0 = on demand only.
    ratings_every_min: int = Field(10, ge=0, le=60)
    # Bootstrap resamples behind the leaderboard's confidence intervals.
    ratings_bootstrap_rounds: int = Field(200, ge=10, le=10000)

    # Jobs
    # A running job's runner renews its lease this often × 3; a job whose lease lapses (its
    # runner died) is started again by a live runner, which resumes it.
    job_lease_s: float = Field(15.0, gt=0)
    # After an abort, how long a job's process may take to stop by itself (training saves a
    # checkpoint) before it is terminated.
    job_stop_grace_s: float = Field(60.0, gt=0)
    # A job started this many times without ending fails instead.
    job_max_attempts: int = Field(3, ge=1)
    # How long an ended job's record is kept; its folder is deleted then too.
    job_keep_s: int = Field(7 * 24 * 3600, gt=0)
    # Folders (besides CORRAL_HOME) whose files jobs created over the API may read (JSON list).
    allowed_paths: list[Path] = Field(default_factory=list)
    # Base URLs (besides this Corral's own gateway) that answer and judgment jobs may call.
    allowed_endpoints: list[str] = Field(default_factory=list)
    # Bounds on job parameters from the API (the CLI on the server is trusted and unbounded).
    job_max_steps: int = Field(100_000, gt=0)
    job_max_epochs: float = Field(100.0, gt=0)
    job_max_batch_size: int = Field(1024, gt=0)
    job_max_length: int = Field(131_072, gt=0)
    job_max_models: int = Field(16, ge=2)
    job_max_inputs: int = Field(64, gt=0)
    # Jobs one key may have queued or running at once, and the disk all job folders may use.
    job_max_active_per_user: int = Field(4, gt=0)
    job_disk_quota_gb: float = Field(100.0, gt=0)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, home: Path) -> Path:
        return home.expanduser()

    @property
    def model_name(self) -> str:
        if self.upstream_url:
            return self.served_name or self.upstream_model or self.model
        return self.served_name or self.model

    @property
    def own_gateway_url(self) -> str:
        """Where this Corral's processes reach its gateway (no /v1)."""
        if self.gateway_url:
            return self.gateway_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def model_info(self, name: str) -> dict[str, Any]:
        """A served name's entry in `model_info_file` (empty without one)."""
        import yaml

        if not self.model_info_file:
            return {}
        entries = yaml.safe_load(Path(self.model_info_file).expanduser().read_text()) or {}
        return dict(entries.get(name) or {})

    def model_metadata(self) -> dict[str, Any]:
        """The served model's metadata: its entry in `model_info_file`, then the flags."""
        info = self.model_info(self.model_name)
        flags = {
            "display_name": self.display_name,
            "link": self.model_link,
            "organization": self.organization,
            "license": self.model_license,
            "description": self.model_description,
        }
        return {**info, **{k: v for k, v in flags.items() if v is not None}}

    def with_overrides(self, **overrides: object) -> Settings:
        """A copy with CLI flags applied; flags left as None keep the environment's value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})
