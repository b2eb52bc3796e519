"""Everything that runs on the device: config, slots, state store, install, boot check, daemon."""
