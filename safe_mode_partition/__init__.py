"""The read-only safe-mode slot: what it holds, how it is built, how it recovers a device."""
