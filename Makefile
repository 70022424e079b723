# Developer shortcuts. The benchmark targets set up .venv themselves (bench/run).
.PHONY: bench bench-quick bench-profile

# The full benchmark suite (~10 minutes on 2 cores): tables printed and written to bench/RESULTS.md.
bench:
	bench/run

# The same suite with smaller runs (~2-3 minutes).
bench-quick:
	bench/run --quick

# py-spy profiles of the hot path (server and client); tops written to bench/PROFILE.md.
bench-profile:
	.venv/bin/python -m bench.profile
