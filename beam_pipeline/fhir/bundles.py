"""One FHIR transaction Bundle per study (``--bundles``), for servers without bulk import.

Every entry is ``PUT {type}/{id}`` with the stable id the resource already has, so posting a Bundle
twice changes nothing (an update with the same content). Referenced resources come first, so servers
that process entries in order find Devices and Observations before the ImagingStudy refers to them.
Pure functions over resource dicts.
"""
from __future__ import annotations

import uuid
from typing import Iterable

from beam_pipeline.codes import sha256_id

# Referenced before referencing: Patient <- Encounter/ServiceRequest <- Endpoint/Device/Observation
# <- ImagingStudy.
ENTRY_ORDER = ("Patient", "Encounter", "ServiceRequest", "Endpoint", "Device", "Observation", "ImagingStudy")


def full_url(resource_type: str, resource_id: str) -> str:
    """A stable ``urn:uuid`` per resource: the Bundle does not know the server's base URL, and a
    relative fullUrl is not allowed; references stay ``Type/id`` and resolve to the PUT entries."""
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource_type}/{resource_id}"))


def transaction_bundle(resources: Iterable[tuple[str, dict]]) -> dict:
    """A transaction Bundle of ``(resource type, resource)`` pairs, each once, as ``PUT type/id``.

    The Bundle id is a hash of the entries' ``type/id``s, so the same study gives the same Bundle.
    """
    unique: dict[tuple[str, str], dict] = {}
    for resource_type, resource in resources:
        unique.setdefault((resource_type, resource["id"]), resource)
    rank = {name: index for index, name in enumerate(ENTRY_ORDER)}
    keys = sorted(unique, key=lambda key: (rank.get(key[0], len(rank)), key))
    return {
        "resourceType": "Bundle",
        "id": sha256_id("transaction", *(f"{t}/{i}" for t, i in keys)),
        "type": "transaction",
        "entry": [{"fullUrl": full_url(t, i), "resource": unique[(t, i)],
                   "request": {"method": "PUT", "url": f"{t}/{i}"}} for t, i in keys],
    }
