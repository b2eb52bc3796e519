"""The release server: API, database, blob storage, audit trail and fleet metrics.

Public entry points: :func:`server.app.create_app` with :class:`server.settings.Settings`
(``fleet server run`` wraps them), and the ``fleet server``, ``release``, ``device`` and
``audit`` command groups in :mod:`server.cli`. One module per word: ``releases``, ``devices``,
``enrollment``, ``assignment`` (the signed check-in answer), ``blobs``, ``audit``, ``auth``;
``api/`` holds the HTTP routes, ``models`` and ``migrations/`` the database. See README.md.
"""
