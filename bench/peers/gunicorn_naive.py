"""gunicorn settings for the naive Flask peer: one gevent worker, gunicorn's defaults otherwise.

Passed with ``-c`` so that the repository's own gunicorn.conf.py (which the project's server
uses) is not picked up for this peer.
"""

worker_class = "gevent"
workers = 1
accesslog = "-"
control_socket_disable = True
