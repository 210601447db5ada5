"""Serve entry point for the dontdie app; replicas and autoscaling live in serve_config.yaml."""
from ray import serve

from api.dontdie_app import build_dontdie_app


@serve.deployment
@serve.ingress(lambda: build_dontdie_app(behind_serve=True))
class DontDieAPI:
    """The app is built on each replica, so connections are never pickled."""


deployment = DontDieAPI.bind()
