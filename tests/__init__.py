"""The test suite (a package, so that ``tests.fixtures`` imports the same way from every folder)."""
