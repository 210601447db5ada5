"""Serve entry point for the epistemic app; replicas and autoscaling live in serve_config.yaml."""
from ray import serve

from api.epistemic_app import build_epistemic_app


@serve.deployment
@serve.ingress(lambda: build_epistemic_app(behind_serve=True))
class EpistemicAPI:
    """The app is built on each replica, so connections are never pickled."""


deployment = EpistemicAPI.bind()
