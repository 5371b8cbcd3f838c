"""`pdxfer proxy`: the OpenAI-compatible routing daemon for prefill/decode pools.

Modules: ``config`` (flags), ``routing`` (policies, pure), ``health`` (health state
machine, pure), ``pool`` (workers, leases, active checks), ``sse`` (event parsing),
``upstream`` (worker calls with deadlines), ``flows`` (sequential / concurrent),
``metrics`` (Prometheus), ``app`` (aiohttp endpoints), ``server`` (run and drain),
``cli`` (``add_arguments`` / ``run``).
"""
