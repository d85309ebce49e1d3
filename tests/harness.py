"""The driver's `run` as the tests call it: no plots (about a second a run; test_cli.py checks
them through the command line) and no fsync (durability is not what these tests check)."""

from functools import partial

from orchestrator import driver

run = partial(driver.run, plots=False, fsync=False)
