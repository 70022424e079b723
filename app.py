"""The service's entry point: ``create_app`` (``wsgi.py`` serves it; the code is in service/)."""

from __future__ import annotations

from service import create_app
from service.edges import BadRequest, authorize, relayed_from_elsewhere
from service.jobs import Jobs
from service.settings import default_config

__all__ = [
    "BadRequest",
    "Jobs",
    "authorize",
    "create_app",
    "default_config",
    "relayed_from_elsewhere",
]
