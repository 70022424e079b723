"""The WSGI entry point: ``gunicorn wsgi:app``. Nothing else here: gevent patches before this import."""

from app import create_app

app = create_app()
