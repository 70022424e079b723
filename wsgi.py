"""The WSGI entry point, ``gunicorn wsgi:app``: nothing else here (gevent patches first)."""

from app import create_app

app = create_app()
