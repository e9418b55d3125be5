// The signed-in session: the access token lives in sessionStorage (this tab only,
// gone when it closes), is sent in the Authorization header, and never appears in
// a URL. Sign-in is SMART App Launch's authorization code flow with PKCE (S256)
// against this node; an operator may instead paste an API token.

const TOKEN = "medledger.token";
const PKCE = "medledger.pkce";
export const CLIENT_ID = "medledger-portal";

export function token() {
  return sessionStorage.getItem(TOKEN);
}

export function signOut() {
  const bearer = token();
  sessionStorage.removeItem(TOKEN);
  sessionStorage.removeItem(PKCE);
  // An access token of the sign-in service is revoked there too (RFC 7009); an API
  // token (mlt_) belongs to its owner and is only forgotten here.
  if (bearer && bearer.startsWith("mla_")) {
    fetch("/oauth/revoke", {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ token: bearer, client_id: CLIENT_ID }).toString(),
      keepalive: true,
    }).catch(() => {});
  }
}

export function useToken(value) {
  sessionStorage.setItem(TOKEN, value.trim());
}

// A failed API call: the OperationOutcome's diagnostics, or the HTTP status.
export class ApiError extends Error {
  constructor(status, message, retryAfterS = null) {
    super(message);
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

async function problem(response) {
  let text = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    const issue = body && body.issue && body.issue[0];
    if (issue && (issue.diagnostics || issue.details)) {
      text = issue.diagnostics || (issue.details && issue.details.text) || text;
    }
  } catch (_) {
    // Not JSON: the status says enough.
  }
  const retry = Number(response.headers.get("Retry-After"));
  return new ApiError(response.status, text, Number.isFinite(retry) && retry > 0 ? retry : null);
}

// Call the node's API as the signed-in user; resolve to the JSON answer or throw ApiError.
export async function api(path, { method = "GET", json, form } = {}) {
  const headers = { Accept: "application/fhir+json, application/json" };
  const bearer = token();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/fhir+json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    headers["Content-Type"] = "application/x-www-form-urlencoded";
    body = new URLSearchParams(form).toString();
  }
  const response = await fetch(path, { method, headers, body, cache: "no-store" });
  if (!response.ok) throw await problem(response);
  return response.json();
}

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomText(n) {
  return base64url(crypto.getRandomValues(new Uint8Array(n)));
}

// The portal's registered redirect URI (decision 0039): /portal/callback on the node's
// public URL, which its SMART configuration names as the issuer.
function redirectUri(issuer) {
  return `${issuer}/portal/callback`;
}

// The SMART configuration of this node, or null when it offers no sign-in service.
export async function smartConfiguration() {
  const response = await fetch("/.well-known/smart-configuration", { cache: "no-store" });
  if (!response.ok) return null;
  return response.json();
}

// Start the authorization code flow with PKCE: a fresh verifier and state per attempt.
export async function startSignIn(config, scope) {
  if (config.issuer !== location.origin) {
    // The node answers sign-ins only at its public URL, and the callback must come back
    // to this tab's origin (the verifier is in its sessionStorage): start over there.
    location.assign(`${config.issuer}/portal/`);
    return;
  }
  const verifier = randomText(48);
  const challenge = base64url(
    await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)),
  );
  const state = randomText(24);
  sessionStorage.setItem(
    PKCE,
    JSON.stringify({ verifier, state, token: config.token_endpoint, issuer: config.issuer }),
  );
  const query = new URLSearchParams({
    response_type: "code",
    client_id: CLIENT_ID,
    redirect_uri: redirectUri(config.issuer),
    scope,
    state,
    // SMART App Launch: the FHIR base the token is for; the node refuses any other.
    aud: `${config.issuer}/fhir`,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${config.authorization_endpoint}?${query}`);
}

// Back from the authorization server: check state, exchange the code, strip the URL.
// Resolves to true when a token was obtained, false when this is no callback.
export async function finishSignIn() {
  const params = new URLSearchParams(location.search);
  if (!params.has("code") && !params.has("error")) return false;
  // Whatever happens next, the code and state leave the address bar and history.
  history.replaceState(null, "", location.pathname);
  const pending = JSON.parse(sessionStorage.getItem(PKCE) || "null");
  sessionStorage.removeItem(PKCE);
  if (params.has("error")) throw new ApiError(401, `sign-in refused: ${params.get("error")}`);
  if (!pending || params.get("state") !== pending.state) {
    throw new ApiError(400, "sign-in answer does not belong to this tab (state mismatch)");
  }
  // RFC 9207: the answer names the server that gave it; it must be the one asked.
  if (params.get("iss") !== pending.issuer) {
    throw new ApiError(400, "sign-in answer comes from another server (iss mismatch)");
  }
  const response = await fetch(pending.token, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: redirectUri(pending.issuer),
      client_id: CLIENT_ID,
      code_verifier: pending.verifier,
    }).toString(),
  });
  if (!response.ok) throw await problem(response);
  const answer = await response.json();
  useToken(answer.access_token);
  return true;
}

// Who the token speaks for (role, patient, institution, members) or null when signed out.
export async function whoAmI() {
  if (!token()) return null;
  try {
    return await api("/portal/api/session");
  } catch (error) {
    if (error.status === 401) {
      signOut();
      return null;
    }
    throw error;
  }
}

export const HOME = {
  patient: "/portal/patient.html",
  clinician: "/portal/clinician.html",
  auditor: "/portal/auditor.html",
  admin: "/portal/auditor.html",
};
