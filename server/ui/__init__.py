"""The web console (``/ui``): server-rendered pages over the same database and roles as the
API, with sessions, CSRF protection and forms of its own (docs/security.md)."""
