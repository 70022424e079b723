"""Benchmarks: this project's streams against the async approach (``python -m bench``).

Every server is started here on 127.0.0.1 (free ports) and stopped at the end; every figure is
the median of several runs and every ratio is taken between measurements of the same run.
"""
