"""Test-suite settings: no plotting window, a throw-away data cache so tests
never read or write the user's ~/.cache/gujax, and one LAPACK thread."""
import os
import tempfile

# GNQ's B x B Cholesky runs in OpenBLAS, whose spinning worker threads make a
# 1 ms solve take tens of ms on a loaded 2-core machine (docs/performance.md).
# Effective only if numpy/scipy are not loaded yet, hence first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["GUJAX_CACHE"] = tempfile.mkdtemp(prefix="gujax-test-cache-")


import chex  # noqa: E402
import pytest  # noqa: E402


def assert_trees_close(got, want, *, rtol, atol=0.0):
    """Every leaf of ``got`` close to the matching leaf of ``want`` (same structure)."""
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


@pytest.fixture
def metric_records(monkeypatch):
    """Control over the trainer's per-step records: ``die_after(n)`` makes the
    n-th metrics.jsonl record raise KeyboardInterrupt (a kill mid-run);
    ``count()`` returns the list the steps of later records are appended to."""
    import gujax.workdir as workdir_module
    real_append = workdir_module.append_jsonl

    class Records:
        def die_after(self, n):
            calls = {"metrics": 0}

            def dying_append(path, record):
                real_append(path, record)
                if path.endswith("metrics.jsonl"):
                    calls["metrics"] += 1
                    if calls["metrics"] == n:
                        raise KeyboardInterrupt
            monkeypatch.setattr(workdir_module, "append_jsonl", dying_append)

        def count(self):
            written = []

            def counting_append(path, record):
                if path.endswith("metrics.jsonl"):
                    written.append(record["step"])
                real_append(path, record)
            monkeypatch.setattr(workdir_module, "append_jsonl", counting_append)
            return written

    return Records()


@pytest.fixture(autouse=True)
def _bars_on_after_each_test():
    """gujax.progress's switch is process-wide; a test that turns bars off
    (through an experiment's --progress false) must not silence the next test
    its worker runs."""
    yield
    from gujax import progress
    progress.set_enabled(True)


def pytest_collection_modifyitems(config, items):
    """CI (``CI`` set) leaves the ``slow`` cases out, to keep its run short;
    ``python -m pytest -m slow`` runs them."""
    if not os.environ.get("CI") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: left out when CI is set (python -m pytest -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
