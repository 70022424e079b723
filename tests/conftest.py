"""Shared fixtures: the real service under gunicorn+gevent, and a real redis-server."""

from pathlib import Path

pytest_plugins = ["tests.service"]
if (Path(__file__).parent / "redis_server.py").exists():
    pytest_plugins.append("tests.redis_server")
