"""The one settings object. Every value comes from an `SMA_`-prefixed environment variable."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ALLOWED_MIME = (
    "application/pdf,image/png,image/jpeg,text/csv,application/json,application/xml,"
    "text/xml,text/plain,application/zip"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMA_", extra="ignore")

    data_dir: Path = Path(".sma-data")
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    ray_address: str = ""
    ray_gcs_port: int = 6390
    ray_dashboard_port: int = 8265
    ray_metrics_port: int = 8090

    object_store: str = "local"  # local | s3
    object_store_dir: Path | None = None
    s3_endpoint: str = ""
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "sma-user-files"
    s3_secure: bool = True
    s3_region: str = "us-east-1"
    presign_seconds: int = 300

    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 25 * 1024 * 1024
    allowed_mime_types: str = DEFAULT_ALLOWED_MIME
    rate_limit_per_minute: int = 100
    auth_cache_seconds: int = 3600

    credential_key: SecretStr = SecretStr("")

    dontdie_base_url: str = "https://api.dontdie.com"
    dontdie_timeout_seconds: float = 10.0
    dontdie_retries: int = 2
    dontdie_concurrency: int = 8
    dd_sync_throttle_seconds: int = 300
    dd_freshness_seconds: int = 3600
    dd_sync_hosts: int = 2

    epistemic_base_url: str = ""
    epistemic_api_key: SecretStr = SecretStr("")
    epistemic_timeout_seconds: float = 10.0

    llm_base_url: str = ""
    llm_api_key: SecretStr = SecretStr("")
    llm_coach_model: str = "gpt-4o-mini"
    llm_user_model: str = "gpt-4o-mini"
    llm_judge_model: str = "gpt-4o-mini"
    llm_timeout_seconds: float = 60.0
    llm_prompt_price_per_1k: float = 0.0  # USD; 0 = unknown, cost not reported
    llm_completion_price_per_1k: float = 0.0

    sim_min_actors: int = 1
    sim_max_actors: int = 4
    sim_jobs_per_actor: int = 4
    sim_max_attempts: int = 3
    sim_heartbeat_seconds: int = 15
    sim_backoff_base_seconds: float = 2.0
    sim_actor_num_cpus: float = 0.25
    sim_scale_down_seconds: float = 60.0
    sim_reconcile_seconds: float = 30.0

    sandbox: bool = False
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sma.db').resolve()}"

    def resolved_object_store_dir(self) -> Path:
        return (self.object_store_dir or self.data_dir / "objects").resolve()

    def allowed_mime_set(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.allowed_mime_types.split(",") if m.strip())

    @property
    def llm_configured(self) -> bool:
        return bool(self.llm_base_url)


@lru_cache
def get_settings() -> Settings:
    return Settings()
