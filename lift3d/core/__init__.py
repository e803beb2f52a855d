"""The core: configuration, stores, the stage graph, registries, the cluster, errors, devices and
checkpoint loading. It knows no stage, reader or command (tests/test_layout.py checks this)."""
