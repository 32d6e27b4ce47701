"""The core layer: pure data and plumbing that every other layer builds on: the adapter config, the
registries, the errors, file and module utilities, and the base models."""
