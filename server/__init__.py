"""The release server: API, database, blob store, rollout engine, dashboard, fleet metrics."""
