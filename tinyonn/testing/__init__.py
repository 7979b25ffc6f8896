"""Test support shipped with the package: the catalogue of bad inputs (`bad_inputs`) that the
tests and the fault suite (`bench/faults.py`) both run."""
