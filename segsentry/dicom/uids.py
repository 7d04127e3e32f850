"""Deterministic UIDs: the same source series and bundle always give the same SEG/SR identifiers, so a result
sent twice (a restart after ``kill -9`` between sending and recording it) replaces itself in the PACS instead
of appearing twice."""

from __future__ import annotations

import uuid


def derived_uid(*parts: str) -> str:
    """A ``2.25.<uuid>`` UID (DICOM PS3.5 B.2) from a name-based (SHA-1, version 5) UUID of ``parts``."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(parts)).int}"
