"""The HTTP routes, by audience: devices, operators, blobs, health and metrics."""
