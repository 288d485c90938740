"""Amberflo: the usage contract meterlake forwards to, a local stand-in server, and the forwarder."""
