"""SMART on FHIR sign-in: the node as an OAuth 2.0 authorization server.

:mod:`~medledger.services.oauth.scopes` and :mod:`~medledger.services.oauth.pkce`
are pure; :mod:`~medledger.services.oauth.server` runs the flows over an
:class:`~medledger.storage.ports.OAuthStore`. HTTP lives in :mod:`medledger.api.oauth`.
"""
