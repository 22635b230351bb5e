"""One typed settings object per process, read once at start-up.

Sources, highest first: constructor arguments, ``PIGMENT_*`` environment
variables, the YAML file named by ``PIGMENT_CONFIG``, then these defaults,
which are the embedded mode (SQLite, a filesystem Celery broker, local image
storage and a local FAISS index under ``data_dir``). Production changes only
configuration, e.g. ``PIGMENT_DATABASE_URL=postgresql+psycopg://...`` and
``PIGMENT_BROKER_URL=redis://localhost:6379/0``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_PRESETS = Path(__file__).resolve().parents[2] / "models" / "presets"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIGMENT_", extra="forbid")

    data_dir: Path = Field(Path("pigment-data"), description="Root for embedded-mode state.")
    # Secrets (URLs carry passwords): SecretStr, so repr, logs and errors show '**********'. Set them as
    # PIGMENT_DATABASE_URL / PIGMENT_BROKER_URL or Settings(database_url=...); read as settings.database_url.
    database_secret: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("PIGMENT_DATABASE_URL",
                                       "database_url"), description="SQLAlchemy URL; default sqlite under data_dir.")
    broker_secret: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("PIGMENT_BROKER_URL", "broker_url"),
                                     description="Celery broker; default a filesystem broker under data_dir.")
    storage_dir: Path | str | None = Field(None, description="Where PNGs are written: a directory (default "
                                          "data_dir/images; shared by every writer and reader) or any fsspec URL, "
                                          "e.g. s3://bucket/pigment (install s3fs).")
    index_dir: Path | None = Field(None, description="FAISS index directory; default data_dir/index.")

    preset: str = Field("toy", description="Model preset name (models/presets/NAME) or a directory.")
    render_backend: str = Field("torch", description="UNet backend: torch | onnxruntime | tensorrt.")
    render_device: str = Field("cpu", description="cpu | cuda")
    render_dtype: str = Field("", description="Precision of every model component: fp32 | fp16 | bf16; empty = "
                              "the preset's (manifest defaults.dtype), else fp32. fp16/bf16 need render_device cuda.")
    default_method: str = Field("pmg", description="Method when the request leaves it unspecified.")
    retrieval_mode: str = Field("generate_only", description="auto | generate_only | retrieve_only | both, "
                                "when the request leaves it unspecified.")
    retrieval_policy: str = Field("threshold", description="How retrieval=auto decides (GILL): threshold | "
                                  "learned (a head from `pigment train decision`, see decision_head).")
    retrieval_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="threshold policy: retrieve when "
                                              "the best catalog cosine (CLIP) is at least this; None = the preset's "
                                              "(manifest retrieval.threshold, tuned for its CLIP by `pigment train "
                                              "decision`); a preset without one never retrieves under auto.")
    retrieval_history_weight: float = Field(0.3, ge=0.0, le=1.0, description="Weight of the user's mean history "
                                            "image embedding in the retrieval query; the rest is the CLIP text "
                                            "embedding of prompt + keywords.")
    retrieval_target_recall: float = Field(0.95, gt=0.0, le=1.0, description="Recall@10 the item index must "
                                           "reach on held-out catalog items: the smallest search effort meeting "
                                           "it is served; below it, `pigment index stats` flags the catalog.")
    index_kind: str = Field("auto", pattern="^(auto|flat|ivf|ivfpq|hnsw)$", description="Item index kind: "
                            "auto (flat below index_flat_threshold; above, the first of IVF, IVF-PQ re-ranked "
                            "and HNSW that meets the target cheaply), flat, ivf, ivfpq or hnsw.")
    index_build_budget_s: float = Field(1200.0, gt=0.0, description="auto builds HNSW only if a timed "
                                        "probe projects its build within this many seconds.")
    index_flat_threshold: int = Field(50_000, ge=1, description="Catalog size from which auto leaves exact search.")
    index_compact_after: int = Field(10_000, ge=1, description="HNSW: deleted/updated vectors hidden in the graph "
                                     "(never served) before a compaction rebuild removes them physically.")
    decision_head: Path | None = Field(None, description="learned policy: directory written by "
                                       "`pigment train decision --out DIR` (manifest-checked).")

    host: str = "127.0.0.1"
    port: int = 50051
    max_concurrent_rpcs: int = Field(64, description="Beyond this, RPCs fail fast with RESOURCE_EXHAUSTED.")
    max_queue_depth: int = Field(256, description="Queued render requests before RESOURCE_EXHAUSTED.")
    render_timeout_s: float = Field(300.0, description="How long the gateway waits for a render.")
    history_limit: int = Field(20, ge=1, description="Most recent interactions fed to the preference model.")
    max_images: int = 8
    max_steps: int = 150
    min_size: int = 16
    max_size: int = 1024
    # -- input caps (services/common/limits.py): checked before anything is stored or decoded
    max_caption_chars: int = Field(2000, ge=1, description="Longest item caption accepted.")
    max_image_bytes: int = Field(10 << 20, ge=1, description="Largest image (PNG or JPEG) accepted, in bytes.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, le=89_478_485, description="Most pixels (width x "
                                  "height, read from the header before decoding) of an accepted image; well "
                                  "below Pillow's own decompression-bomb limit.")
    ingest_root: Path | None = Field(None, description="`pigment ingest` reads image_path files only under "
                                     "this folder (default: the items file's folder).")
    render_batch_window_ms: float = Field(0.0, ge=0, description="Gateway micro-batching window: requests "
                                          "arriving within it are sent to the worker as one batch (0 = off).")
    render_max_batch: int = Field(8, ge=1, description="Most requests in one render batch.")
    render_queue: str = Field("render.cpu", description="Celery queue for this device class.")
    worker_max_tasks_per_child: int = 200

    # -- fault tolerance (services/gateway/reaper.py, services/render/liveness.py)
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a worker refreshes its heartbeat "
                                        "row and the heartbeat of each request it renders.")
    heartbeat_stale_s: float = Field(30.0, gt=0, description="A running request (or a worker) silent this long "
                                     "is presumed dead: the reaper re-sends the request, readiness drops.")
    requeue_queued_after_s: float = Field(60.0, gt=0, description="A request still queued this long after its "
                                          "last send is sent again (the broker may have lost it; a duplicate "
                                          "task is a no-op).")
    max_render_attempts: int = Field(3, ge=1, description="Claims of one request by workers that died before "
                                     "it finished; then it fails UNAVAILABLE instead of killing more workers.")
    reaper_interval_s: float = Field(2.0, gt=0, description="How often the gateway looks for stranded requests.")
    grpc_reserve_threads: int = Field(8, ge=1, description="gRPC threads beyond max_concurrent_rpcs, kept for "
                                      "health checks and fast rejections while every slot renders.")

    # -- identity and access (services/common/auth.py); README "Security"
    auth_keys_file: Path | None = Field(None, description="YAML/JSON file mapping sha256(API key) -> {tenant, "
                                        "scopes} (`pigment auth add-key` writes it). Set: every call needs "
                                        "`authorization: Bearer <key>`. Unset: no auth, allowed only on loopback.")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate (chain): serve gRPC and HTTP "
                                       "over TLS. Needs tls_key_file.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA: require client certificates signed by "
                                            "it (mTLS), on top of the API key.")
    api_key_secret: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("PIGMENT_API_KEY", "api_key"),
                                      description="Client side: the key that commands calling a server "
                                      "(`pigment ingest --address`) send as `authorization: Bearer` (read as "
                                      "settings.api_key; a SecretStr like the URLs).")
    rate_limit_storage: str = Field("memory://", description="`limits` storage URL for per-tenant limits: "
                                    "memory:// (one process) or redis://host:6379/1 (shared by gateways).")
    rate_limit_calls: str = Field("", description="Per-tenant limit on calls, e.g. \"20/second;1000/minute\" "
                                  "(empty = none). Exceeded: RESOURCE_EXHAUSTED with RetryInfo.")
    rate_limit_images: str = Field("", description="Per-tenant quota of images rendered (new requests; a batch "
                                   "job counts users x images), e.g. \"120/minute;10000/day\" (empty = none).")
    rate_limit_tenants: dict[str, dict[str, str]] = Field(default_factory=dict, description="Per-tenant "
                                                          "overrides, e.g. {\"acme\": {\"images\": \"1000/day\"}} "
                                                          "(\"\" = no limit for that tenant).")

    # -- the HTTP/JSON face and image delivery (services/gateway/http.py); README "HTTP/JSON and the gallery"
    public_http_url: str = Field("", description="Base URL of the HTTP face as callers reach it (e.g. "
                                 "https://api.example.com), used in signed image URLs; empty = the scheme, host "
                                 "and port this process serves HTTP on (no HTTP face: images always inline).")
    inline_image_max_bytes: int = Field(1 << 20, ge=0, description="Images travel inline up to this many bytes "
                                        "per response (GeneratePersonalized, GetGeneration); the rest as signed "
                                        "URLs, when an HTTP face serves them.")
    image_url_ttl_s: float = Field(900.0, gt=0, le=7 * 86400, description="How long a signed image URL stays "
                                   "valid.")
    url_signing_key_file: Path | None = Field(None, description="Secret for signed image URLs (any bytes; every "
                                              "gateway of a deployment needs the same file); default "
                                              "data_dir/url-signing.key, created on first use.")
    http_cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the HTTP "
                                         "face from a browser (CORS); empty = none (same-origin only).")
    http_max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest HTTP request body (413 above).")
    http_request_timeout_s: float = Field(330.0, gt=0, description="An HTTP request's deadline (504 after it); "
                                          "a blocking generate waits at most this long.")
    http_keep_alive_s: float = Field(5.0, gt=0, description="Idle keep-alive connections close after this long.")

    # -- operations (deploy/, README "Operations")
    log_format: str = Field("text", pattern="^(text|json)$", description="text | json (one object per line "
                            "with request_id and trace_id; the images set json).")
    trace_exporter: str = Field("off", pattern="^(off|console|jsonl|otlp)$", description="OpenTelemetry spans: "
                                "off | console | jsonl (to trace_file) | otlp (OTEL_EXPORTER_OTLP_* variables).")
    trace_file: Path | None = Field(None, description="jsonl exporter: where spans go; default data_dir/traces.jsonl.")
    worker_metrics_port: int | None = Field(None, ge=0, le=65535, description="A render worker serves Prometheus "
                                            "/metrics on this port (None = off; 0 = a free one).")
    render_notify: str = Field("auto", pattern="^(auto|poll)$", description="How the gateway learns a render is "
                               "done: auto (PostgreSQL LISTEN/NOTIFY when the database is PostgreSQL, else SQL "
                               "polling) | poll (always poll SQL every 50 ms).")
    notify_safety_poll_s: float = Field(1.0, gt=0, description="With notifications on, re-read SQL at least this "
                                        "often anyway (a notification lost with its connection costs at most this).")
    shutdown_grace_s: float | None = Field(None, ge=0, description="SIGTERM: how long in-flight calls may finish "
                                           "(default render_timeout_s + 10, so a render in hand completes).")
    shutdown_delay_s: float = Field(0.0, ge=0, description="SIGTERM: answer NOT_SERVING this long before refusing "
                                    "new calls, so load balancers stop routing first (k8s: > readiness period).")

    # -- scheduled retraining (training/retrain.py, a worker plug-in) and exploration
    retrain_every_s: float = Field(0.0, ge=0, description="Celery beat runs the retrain job this often "
                                   "(0 = off; `pigment` workers started by the stack then also run beat).")
    retrain_kind: str = Field("pigeon_lora", description="Which adapter the retrain job trains: pigeon_lora "
                              "(Pigeon DPO on the keyword LLM, from picks between keyword lists) or unet_lora "
                              "(Diffusion-DPO on a UNet LoRA, from picks between images rendered from the same "
                              "conditioning, e.g. one request's images; needs the stored images).")
    retrain_queue: str = Field("retrain", description="Celery queue of the retrain task.")
    retrain_gate: str = Field("", description="Promotion gate by name: preference (held-out logged pairs + a "
                              "CLIP content guard; any preset) | toy (the toy world's evaluator); empty = the "
                              "preset's (manifest retrain.gate), else preference.")
    worker_plugins: list[str] = Field(["pigment.training.retrain"], description="Modules a render worker imports "
                                      "to register more Celery tasks (the retrain job lives with the trainers).")
    retrain_timeout_s: float = Field(3600.0, gt=0, description="Soft time limit of one retrain run.")
    retrain_max_pairs_per_user: int = Field(16, ge=1, description="Most preference pairs one user contributes "
                                            "to a training round (a flooding user cannot outweigh the others).")
    retrain_min_pairs: int = Field(8, ge=1, description="Fewer pairs than this: the run is skipped.")
    retrain_eval_samples: int = Field(48, ge=1, description="Held-out-user windows scored before promotion.")
    retrain_eval_seed: int = Field(1, description="Sample seed of the promotion gate's held-out windows (the "
                                   "bench reports another seed, so selection never sees the reported sample).")
    retrain_max_fidelity_drop: float = Field(0.05, ge=0, le=1, description="A candidate whose content "
                                             "fidelity drops more than this below the serving one is rejected.")
    retrain_config: Path | None = Field(None, description="YAML of trainer overrides for retrain_kind "
                                        "(PigeonTrainConfig or DiffusionDPOConfig fields: steps, lr, beta, ...).")
    preference_explore_rate: float = Field(0.0, ge=0, le=1, description="Fraction of keyword requests served "
                                           "with an explored keyword list (some attributes resampled from the "
                                           "vocabulary) so that picks compare lists; flagged EXPLORED. 0 = off.")
    preference_explore_seed: int = Field(0, description="Seed of the exploration draws (reproducible runs).")
    feedback_max_rows: int = Field(64, ge=0, le=10000, description="Newest feedback rows of a user read per "
                                   "request as preference evidence (the flood cap: older rows age out).")
    signal_half_life_s: float = Field(0.0, ge=0, description="Half-life of interaction and feedback weights "
                                      "in seconds (time decay); 0 = no decay.")

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.data_dir = Path(self.data_dir).absolute()
        if not self.database_url:
            self.database_secret = SecretStr(f"sqlite:///{self.data_dir / 'pigment.db'}")
        if not self.broker_url:
            self.broker_secret = SecretStr("filesystem://")
        if "://" not in str(self.storage_dir or ""):  # an object-store URL stays as given
            self.storage_dir = Path(self.storage_dir or self.data_dir / "images").absolute()
        self.index_dir = Path(self.index_dir or self.data_dir / "index").absolute()
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self

    def index_config(self):
        """The item index's IndexConfig (imported lazily: settings load without faiss)."""
        from pigment.services.history.index_factory import IndexConfig

        return IndexConfig(kind=self.index_kind, flat_threshold=self.index_flat_threshold,
                           target_recall=self.retrieval_target_recall, compact_after=self.index_compact_after,
                           build_budget_s=self.index_build_budget_s)

    @model_validator(mode="after")
    def _check_dtype(self) -> Settings:
        if self.render_dtype not in ("", "fp32", "fp16", "bf16"):
            raise ValueError(f"render_dtype={self.render_dtype!r} is not allowed: fp32 | fp16 | bf16")
        if self.render_dtype in ("fp16", "bf16") and not self.render_device.startswith("cuda"):
            raise ValueError(f"render_dtype={self.render_dtype!r} needs render_device cuda "
                             f"(got {self.render_device!r}); use fp32 on cpu")
        return self

    @property
    def database_url(self) -> str:
        return self.database_secret.get_secret_value()

    @property
    def broker_url(self) -> str:
        return self.broker_secret.get_secret_value()

    @property
    def api_key(self) -> str:
        return self.api_key_secret.get_secret_value()

    @property
    def grace_s(self) -> float:
        return self.render_timeout_s + 10 if self.shutdown_grace_s is None else self.shutdown_grace_s

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("filesystem")

    @property
    def verified_files(self) -> Path:
        """Model files already verified against their manifest, by (path, size, mtime, inode)."""
        return self.data_dir / "verified-files.json"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def preset_dir(self) -> Path:
        """A directory name wins; else the repo's shipped preset; `tiny` is built on first use."""
        candidate = Path(self.preset)
        if candidate.is_dir():
            return candidate.absolute()
        shipped = REPO_PRESETS / self.preset
        if (shipped / "manifest.json").is_file():
            return shipped
        return self.data_dir / "presets" / self.preset

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The secret URLs' aliases would also match unprefixed DATABASE_URL / BROKER_URL: read PIGMENT_* only.
        env_settings.env_vars = {k: v for k, v in env_settings.env_vars.items() if k.lower().startswith("pigment_")}
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PIGMENT_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)
