"""Pure functions, layers, networks, readers, the configuration, the stores, losses, checkpoints."""
