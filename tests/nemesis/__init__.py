"""A nemesis harness: real jobs on real workers while faults strike at random, then invariants.

`harness.run` is the entry point; `test_nemesis.py` is its short seeded run, `bench/nemesis.py`
the long one. docs/reliability.md ("The nemesis") says what it injects and checks.
"""
