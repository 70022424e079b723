"""Stream JSON over HTTP from Flask under gunicorn+gevent, and read it back as a collection."""
