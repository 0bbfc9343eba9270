"""Test-suite settings: no plotting window, and a throw-away data cache so
tests never read or write the user's ~/.cache/gujax."""
import os
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["GUJAX_CACHE"] = tempfile.mkdtemp(prefix="gujax-test-cache-")
