"""Tests of the release server (integration tier: in-process app, real HTTP, SQLite and
PostgreSQL)."""
