"""Speed and memory measurements (`make bench`); never part of the test suite."""
