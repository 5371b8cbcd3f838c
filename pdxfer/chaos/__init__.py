"""`pdxfer chaos`: fault injection against real sender and receiver processes.

`faults` decides what to break and when (seeded, no I/O), `relay` breaks the TCP data
stream, `worker` is a sender process that counts every outcome, and `runner` applies the
schedule and judges the run: no corruption, no hang, no leak, and recovery afterwards.
"""
