"""The box: one memory ledger for every engine `llamactl serve` runs, and the scheduler lanes ask for room.

`ledger` and `evict` are pure (plain data in, a decision out); `scheduler` owns the ledger and talks to lanes.
"""
