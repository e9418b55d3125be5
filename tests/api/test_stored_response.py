"""A read's answer, built with its headers laid out, is what the generic response was.

Read and vread answer with ``StoredResourceResponse`` (a raw header list
written directly); it must carry the same status, body, media type and raw
headers, in the same order, as ``raw_fhir_response`` with the version's
``ETag``, ``Last-Modified`` and ``Location``, as both answered before.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from medledger.api.responses import StoredResourceResponse, raw_fhir_response

_LATIN1 = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=40)


@given(
    data=st.binary(max_size=300),
    etag=_LATIN1,
    last_modified=_LATIN1,
    location=_LATIN1,
)
def test_the_stored_resource_response_is_the_raw_fhir_response(
    data: bytes, etag: str, last_modified: str, location: str
) -> None:
    laid_out = StoredResourceResponse(
        data, etag=etag, last_modified=last_modified, location=location
    )
    generic = raw_fhir_response(
        data, headers={"ETag": etag, "Last-Modified": last_modified, "Location": location}
    )
    assert laid_out.status_code == generic.status_code == 200
    assert laid_out.body == generic.body == data
    assert laid_out.media_type == generic.media_type
    assert laid_out.background is None and generic.background is None
    assert laid_out.raw_headers == generic.raw_headers
    assert dict(laid_out.headers) == dict(generic.headers)
