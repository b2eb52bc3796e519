"""The operator commands of the server side, one module per command group:

=============== ==========================================================================
module          commands
=============== ==========================================================================
serve           ``fleet server run``
credentials     ``fleet server token ...``, ``fleet server enrollment-token ...``
releases        ``fleet release ...``
devices         ``fleet device ...``
audit           ``fleet audit ...``
rollouts        ``fleet rollout ...``, ``fleet emergency-stop``
common          the options, output and connections they share
=============== ==========================================================================

``fleet server ...`` runs on the server's host and works on its data directory or database
directly (running the server, creating the first admin token). The other groups talk to a
running server over HTTP (see ``server/client.py`` for where the URL and token come from).
Commands that take ``--data-dir``/``--database-url`` work directly on the database when given
one, over HTTP otherwise.

The web stack (FastAPI, SQLAlchemy, uvicorn) and requests are imported inside the commands, so
loading these modules costs nothing but click.
"""
