"""The stages' orchestration: what each notebook builds, in what order, and what it reuses.

One module per notebook: ``rank`` (02), ``prune`` (03), ``recover`` (04), ``quantize`` (05),
``measure`` (06), ``judge`` (07); 01 is calls into ``training`` and ``evaluation`` only. These modules
plan, loop over variants, register results in the run and read them back on a rerun; the algorithms
they call live in the modules below them (``pruning``, ``training``, ``quantizers``, ...).
"""
