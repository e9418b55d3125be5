"""FHIR patch: JSON Patch (RFC 6902; FHIR R4 §3.1.0.5) through the ``jsonpatch`` library,
and JSON Merge Patch (RFC 7386), which clients such as fhirpy send as ``application/json``.

Both are pure: they return the patched copy of a resource or raise. A patch must not change what the resource is (``resourceType``,
``id``); what it leaves is validated like any update by the records service.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer

from medledger.core.errors import PreconditionFailed
from medledger.services.fhir import FhirInvalid, Issue

__all__ = ["MAX_PATCH_OPERATIONS", "apply_json_patch", "apply_merge_patch"]

#: Far more than any real edit; a bound on the work one request asks for.
MAX_PATCH_OPERATIONS = 1000


def _invalid(diagnostics: str, code: str = "invalid") -> FhirInvalid:
    return FhirInvalid([Issue(severity="error", code=code, diagnostics=diagnostics)])


def apply_json_patch(resource: dict[str, Any], operations: Any) -> dict[str, Any]:
    """``resource`` with the JSON Patch ``operations`` applied (``resource`` is not changed).

    A malformed patch, or one that cannot apply, raises :class:`FhirInvalid`;
    a failing ``test`` operation raises :class:`PreconditionFailed` (the
    resource is not what the client expected).
    """
    if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
        raise _invalid("a JSON Patch is a JSON array of operation objects", "structure")
    if len(operations) > MAX_PATCH_OPERATIONS:
        raise _invalid(f"a patch may hold at most {MAX_PATCH_OPERATIONS} operations", "too-costly")
    try:
        patch = jsonpatch.JsonPatch(operations)
        patched = patch.apply(copy.deepcopy(resource))
    except jsonpatch.JsonPatchTestFailed:
        # The library's messages quote the resource's values (PHI): never echoed.
        raise PreconditionFailed("a JSON Patch test operation failed") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _invalid(
            f"the JSON Patch does not apply to the resource ({type(exc).__name__})", "processing"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise _invalid(f"the JSON Patch is malformed ({type(exc).__name__})", "structure") from None
    if not isinstance(patched, dict):
        raise _invalid("the patch must leave a JSON object")
    for key in ("resourceType", "id"):
        if patched.get(key) != resource.get(key):
            raise _invalid(f"a patch may not change the resource's {key}")
    return patched


def apply_merge_patch(resource: dict[str, Any], patch: Any) -> dict[str, Any]:
    """``resource`` with the JSON Merge Patch ``patch`` applied (RFC 7386 §2).

    An object merges member by member, ``null`` removes a member, anything
    else replaces it. ``resource`` is not changed.
    """
    if not isinstance(patch, dict):
        raise _invalid("a merge patch is a JSON object", "structure")
    patched = _merge(resource, patch)
    assert isinstance(patched, dict)
    for key in ("resourceType", "id"):
        if patched.get(key) != resource.get(key):
            raise _invalid(f"a patch may not change the resource's {key}")
    return patched


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged
