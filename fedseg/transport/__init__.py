"""fedseg over Flower: a ServerApp and a ClientApp that carry fedseg's own files.

Nothing here imports flwr at import time except `apps`, `flower_simulation` and `deploy`, which
need the optional extra `fedseg[flower]`. The coordinator (`coordinator`) and the site
(`site`) sides are plain fedseg code: what travels in a Flower Message is exactly the bytes of
the weight files (and their `.sig`) that the file protocol exchanges, and the coordinator
aggregates them with `fedseg.federation.aggregation.aggregate_round`, so there is one
implementation of every strategy.
"""
