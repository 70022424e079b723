"""The service's entry point: ``create_app`` (``wsgi.py`` serves it; the code is in service/)."""

from __future__ import annotations

from service import create_app
from service.edges import relayed_from_elsewhere
from service.jobs import Jobs

__all__ = ["Jobs", "create_app", "relayed_from_elsewhere"]
