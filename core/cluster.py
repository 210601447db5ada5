"""Start a local Ray cluster and deploy serve_config.yaml on it (embedded run and e2e tests)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from core.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_config.yaml"

RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "DEEPEVAL_TELEMETRY_OPT_OUT": "1",
    "DEEPEVAL_DISABLE_DOTENV": "1",
}


def load_serve_config(http_port: int, overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """The config file, with the HTTP port set and per-deployment option overrides applied."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            extra = (overrides or {}).get(deployment["name"])
            if extra:
                if "num_replicas" in extra:
                    deployment.pop("autoscaling_config", None)
                deployment.update(extra)
    return config


def start_local_ray(*, gcs_port: int | None, dashboard_port: int, include_dashboard: bool = True,
                    object_store_mb: int = 200, env: dict[str, str] | None = None,
                    metrics_port: int | None = None) -> None:
    """A single-node cluster on loopback. Workers inherit this process's environment."""
    import ray

    for key, value in {**RAY_ENV_DEFAULTS, **(env or {})}.items():
        os.environ[key] = value
    # HAProxy ingress and user code on the replica's own event loop (no thread hop per
    # request): together 2-3x the defaults' throughput here (bench/README.md). Not the whole
    # RAY_SERVE_THROUGHPUT_OPTIMIZED bundle: it also moves a driver's handle router onto the
    # caller's event loop, where it outlives ray.shutdown() and hangs re-connecting.
    # An operator can turn either off by setting the variable.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    # HAProxy mode listens on fixed ports besides the HTTP one (stats 8404, metrics 9101, the
    # fallback proxy 8500/9500): a second local cluster (tests beside `sma run`) could not
    # start its ingress.
    for variable in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        os.environ.setdefault(variable, str(free_port()))
    if gcs_port:
        # Ray's own default is Redis's port 6379; ours is configurable (SMA_RAY_GCS_PORT).
        os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             object_store_memory=object_store_mb * 1024 * 1024, namespace="serve",
             log_to_driver=False, configure_logging=False, _metrics_export_port=metrics_port)


def deploy(config: dict, timeout: float = 180.0) -> None:
    from ray.serve._private import api as serve_private
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_private.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=ProxyLocation(schema.proxy_location))
    client.deploy_apps(schema, _blocking=False)
    wait_until_running([app["name"] for app in config["applications"]], timeout)


def wait_until_running(app_names: list[str], timeout: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in app_names}
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        failed = {n: s.message for n, s in states.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve deployment failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps not running after {timeout}s: "
                               f"{ {n: (s.status if s else None) for n, s in states.items()} }")
        time.sleep(0.5)
