"""The metering service: meters, usage events from anywhere, usage queries and cancellation over the lake.

The domain (registry, ingest, usage, cancellation, auth) is adapter-free; ``app`` is the ASGI adapter that speaks
both dialects (the SaaS Builder Toolkit plug-in's and Amberflo's own), ``local`` wires it to the local lake.
"""
