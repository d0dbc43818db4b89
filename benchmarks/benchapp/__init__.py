"""The benchmark suite's Django app: a row of the app's own, the functions and actors it times.

Only ``benchmarks/bench_settings.py`` installs it; it is not part of the package.
"""
