"""The driver's `run` as the tests call it: no plots (about a second a run; test_cli.py checks
them through the command line) and no fsync (durability is not what these tests check)."""

from functools import partial

from orchestrator import driver

run = partial(driver.run, plots=False, fsync=False)


def sigint_default() -> None:
    """A child process's `preexec_fn` for the tests that interrupt it: SIGINT back to its default,
    so Python in the child turns it into KeyboardInterrupt. A suite started in the background by
    a non-interactive shell (`cmd &`) inherits SIGINT ignored, and so would every child."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
