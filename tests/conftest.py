"""pytest configuration: makes tests/cases.py importable as `cases` and declares our markers."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "asan_subset: emulator tests that also run under ASan+UBSan (make test runs them "
        "a second time against the sanitizer build); together they execute every CUDA kernel and "
        "both decode paths")
