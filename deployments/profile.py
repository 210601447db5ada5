"""Serve entry point for the profile app; replicas and autoscaling live in serve_config.yaml."""
from ray import serve

from api.profile_app import build_profile_app


@serve.deployment
@serve.ingress(lambda: build_profile_app(behind_serve=True))
class ProfileAPI:
    """The app is built on each replica, so connections are never pickled."""


deployment = ProfileAPI.bind()
