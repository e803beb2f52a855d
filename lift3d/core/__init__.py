"""The core: configuration, stores, the stage graph, registries, the cluster, errors, devices and
checkpoint loading. It knows no stage, reader or command (tests/unit/test_layout.py checks this)."""
