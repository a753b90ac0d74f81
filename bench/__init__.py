"""The benchmark: ``make bench`` (outside the test run)."""
