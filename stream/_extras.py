"""What a missing optional dependency tells the user: the extra that installs it.

The base install brings orjson only; each framework or transport comes with an extra of the
distribution (``pip install 'flask-json-stream[aio]'``). The modules that need one import it
under ``try`` and raise :func:`missing` instead of a bare ``No module named 'httpx'``.
"""

from __future__ import annotations

#: the name on the package index (the import name is ``stream``)
DISTRIBUTION = "flask-json-stream"

#: extra -> what it enables, for the message
EXTRAS = {
    "flask": "stream_response (the Flask adapter)",
    "client": "stream.Client and the command line",
    "aio": "stream.aio.AsyncClient",
    "redis": "the Redis Streams broker",
    "metrics": "Prometheus metrics",
    "server": "serving under gunicorn with gevent workers",
}


def install_hint(extra: str) -> str:
    """The shell command that installs ``extra``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing(extra: str, exc: ImportError) -> ModuleNotFoundError:
    """An error for ``exc`` (a failed import) that names the extra bringing the module."""
    what = EXTRAS.get(extra, extra)
    module = exc.name or "a dependency"
    return ModuleNotFoundError(
        f"{what} needs {module}, which is not installed: {install_hint(extra)}",
        name=exc.name,
    )
