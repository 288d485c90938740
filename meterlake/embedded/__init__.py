"""The embedded default: the local stand-ins of AWS services wired into one running pipeline on one machine.

``stack`` runs it (what ``meterlake up`` keeps running), ``running`` records which gateway serves a data dir, and
``demo`` drives it end to end (``make demo``). The stand-ins themselves live in :mod:`meterlake.local`.
"""
