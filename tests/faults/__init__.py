"""Reliability: killed and resumed runs, the bad-input corpus, I/O faults and concurrent runs."""
