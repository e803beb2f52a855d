"""Dataset readers, one module per dataset kind of stages.yaml; each registers through the entry points
of pyproject.toml (``lift3d.readers``). :mod:`.base` holds the interface."""
