"""lazysnap's benchmarks (issue 5): cold container starts on a shaped link, and micro-benchmarks.

Nothing here runs in `make test`; see RESULTS.md for how to run it and what it measured.
"""
