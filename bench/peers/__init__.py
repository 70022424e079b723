"""The peers measured by bench/: small apps serving the same event shape as the project.

``{"event_id": i, "data": <one of the seed's four messages>, "is_last_event": bool}``; the
``/stamped`` variants add ``"t"``, the server's ``time.time()`` when the event is yielded.
"""

#: The seed's four messages (app.SEED_MESSAGES; repeated here so the peers never import the app).
SEED_MESSAGES = ("some data", "some more data", "and more", "finally the end")
