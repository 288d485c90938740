"""The base of every config section, shared by meterlake.config and the sections defined beside their code."""

from __future__ import annotations

from msgspec import Struct


class ConfigSection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A config section: keyword-only, immutable, and unknown keys are typos, so they are rejected."""
