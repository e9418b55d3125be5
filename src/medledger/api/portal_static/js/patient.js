// The patient's page: my key, where my records are, my consents (granted and revoked
// with my key, in this browser), and every access to my records.

import { canonical, canonicalBytes } from "./canonical.js";
import { api } from "./session.js";
import { $, el, fill, guard, onSubmit, say, short, table, when } from "./ui.js";
import { createWallet, loadWallet } from "./wallet.js";

const PURPOSES = {
  TREAT: "treatment",
  ETREAT: "emergency treatment",
  HPAYMT: "healthcare payment",
  HOPERAT: "healthcare operations",
  PUBHLTH: "public health",
  HRESCH: "healthcare research",
  PATRQT: "patient requested",
  FAMRQT: "family requested",
};
const TYPES = ["Observation", "Condition", "Encounter", "AllergyIntolerance", "MedicationRequest", "Patient"];
const DAY_MS = 86_400_000;
const CONSENT_TX = "urn:medledger:consent-tx";
const REVOKE_TX = "urn:medledger:consent-revoke-tx";
const CONSENT_FRAME = {
  resourceType: "Consent",
  scope: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/consentscope", code: "patient-privacy" }] },
  category: [{ coding: [{ system: "http://loinc.org", code: "59284-0" }] }],
};

let me;
let wallet = null;
let enrolled = null;
let trail = null;

function dateInput(ms) {
  return new Date(ms).toISOString().slice(0, 10);
}

async function showKey() {
  enrolled = await api(`/fhir/Patient/${encodeURIComponent(me.patient)}/$enrollment`);
  wallet = await loadWallet();
  const mine = wallet ? await wallet.fingerprint() : null;
  const target = $("#key");
  if (enrolled.fingerprint && mine === enrolled.fingerprint) {
    fill(target, el("p", {}, el("span", { class: "badge ok", text: "enrolled" }),
      ` This browser holds your key (fingerprint ${short(mine, 16)}); it signs your consents here.`));
    return;
  }
  if (enrolled.fingerprint) {
    wallet = null;
    fill(target, el("p", {
      text: `You are enrolled with a key held elsewhere (fingerprint ${short(enrolled.fingerprint, 16)}). ` +
        "Consents are signed with that key (the medledger wallet); this browser cannot sign for it.",
    }));
    return;
  }
  if (wallet) {
    // This browser's key is bound elsewhere (another institution): enroll it here too.
    fill(target,
      el("p", { text: `No key is enrolled for you here yet. Enroll the key this browser holds (fingerprint ${short(mine, 16)}).` }),
      el("button", { type: "button", id: "enroll", text: "Enroll this browser's key", onclick: enroll }));
    return;
  }
  fill(target,
    el("p", { text: "No key is enrolled for you here yet. Create one in this browser: its private part cannot leave the browser." }),
    el("button", { type: "button", id: "enroll", text: "Create my key and enroll", onclick: enroll }));
}

async function enroll() {
  try {
    const created = wallet || (await createWallet());
    const statement = { "medledger-enroll": { institution: enrolled.institution, pseudonym: enrolled.pseudonym } };
    const signature = await created.sign(canonicalBytes(statement));
    await api(`/fhir/Patient/${encodeURIComponent(me.patient)}/$enroll`, {
      method: "POST",
      json: { patient_key: created.publicDerHex, signature },
    });
    say("#status", "Your key is enrolled.", "ok");
    await refresh();
  } catch (error) {
    say("#status", error.message, "error");
  }
}

function consentRow(consent) {
  const provision = consent.provision || {};
  const grantee = (((provision.actor || [])[0] || {}).reference || {}).identifier?.value || "—";
  const scope = (provision.class || []).map((c) => c.code).join(", ") || "all records";
  const purpose = ((provision.purpose || [])[0] || {}).code || "—";
  const period = provision.period || {};
  const active = consent.status === "active";
  const action = active && wallet
    ? el("button", { type: "button", class: "secondary", text: "Revoke", "aria-label": `Revoke consent for ${grantee}`, onclick: () => revoke(consent) })
    : el("span", { text: active ? "" : "—" });
  return [
    el("code", { text: consent.id, title: "consent id" }),
    grantee, scope, PURPOSES[purpose] || purpose,
    `${(period.start || "").slice(0, 10)} to ${(period.end || "").slice(0, 10)}`,
    el("span", { class: `badge ${active ? "ok" : "wait"}`, text: consent.status }),
    action,
  ];
}

async function showConsents() {
  if (!enrolled.fingerprint) {
    fill("#consents", el("p", { text: "Enroll a key first." }));
    return;
  }
  const bundle = await api("/fhir/Consent");
  const consents = (bundle.entry || []).map((e) => e.resource);
  fill("#consents", table("Consents you gave", ["Consent", "Who may read", "Which records", "Purpose", "Period", "Status", ""],
    consents.map(consentRow)));
}

async function grant(data) {
  if (!wallet) throw new Error("This browser holds no enrolled key for you.");
  const fingerprint = await wallet.fingerprint();
  const now = Date.now();
  const all = data.getAll("scope");
  const scope = all.includes("*") || all.length === 0 ? ["*"] : all;
  const start = Date.parse(`${data.get("start")}T00:00:00Z`);
  const expires = Date.parse(`${data.get("end")}T00:00:00Z`);
  if (!(expires > Math.max(now, start))) throw new Error("The end date must be after the start date and today.");
  const body = {
    patient: fingerprint,
    patient_key: wallet.publicDerHex,
    grantee: String(data.get("grantee")),
    scope,
    purpose: String(data.get("purpose")),
    expires_ms: expires,
  };
  // A period starting later than now starts at that date; otherwise at the grant.
  if (start > now) body.starts_ms = start;
  const tx = await wallet.signTx({ type: "consent.grant", chain: me.consortium, body, time_ms: now });
  const provision = {
    type: "permit",
    actor: [{ reference: { identifier: { system: "urn:medledger:member", value: body.grantee } } }],
    purpose: [{ system: "http://terminology.hl7.org/CodeSystem/v3-ActReason", code: body.purpose }],
  };
  if (scope[0] !== "*") provision.class = scope.map((code) => ({ system: "http://hl7.org/fhir/resource-types", code }));
  say("#grant-status", "Signing and waiting until the consortium has made it final…");
  const made = await api("/fhir/Consent", {
    method: "POST",
    json: {
      ...CONSENT_FRAME,
      status: "active",
      patient: { identifier: { system: "urn:medledger:patient-key", value: fingerprint } },
      provision,
      extension: [{ url: CONSENT_TX, valueString: canonical(tx) }],
    },
  });
  say("#grant-status", `Consent ${made.id} granted to ${body.grantee}; it is final on the consortium chain.`, "ok");
  await showConsents();
}

async function revoke(consent) {
  try {
    const fingerprint = await wallet.fingerprint();
    const tx = await wallet.signTx({
      type: "consent.revoke",
      chain: me.consortium,
      body: { patient: fingerprint, patient_key: wallet.publicDerHex, grant: consent.id },
      time_ms: Date.now(),
    });
    await api(`/fhir/Consent/${consent.id}`, {
      method: "PUT",
      json: {
        ...CONSENT_FRAME,
        id: consent.id,
        status: "inactive",
        patient: { identifier: { system: "urn:medledger:patient-key", value: fingerprint } },
        extension: [{ url: REVOKE_TX, valueString: canonical(tx) }],
      },
    });
    say("#status", `Consent ${short(consent.id)} revoked.`, "ok");
    await showConsents();
  } catch (error) {
    say("#status", error.message, "error");
  }
}

function member(reference) {
  return reference?.identifier?.value || "";
}

function recordRef(value) {
  const [type, ref] = String(value).split(":");
  return ref ? `${type} (ref ${short(ref, 10)})` : type;
}

function eventRow(event) {
  const agent = (event.agent || [])[0] || {};
  const record = (event.entity || []).find((e) => e.what?.identifier?.system === "urn:medledger:record");
  const consent = (event.entity || []).find((e) => e.name === "consent");
  const refused = event.outcome !== "0";
  const what = event.type?.code === "rest" ? "read" : event.subtype?.[0]?.code || event.type?.display;
  return [
    when(Date.parse(event.recorded)),
    `${member(agent.who)}${agent.altId ? ` (${agent.altId})` : ""}`,
    what,
    // Chains name a record by type and a keyed reference, never by its id.
    record ? recordRef(record.what.identifier.value) : "—",
    el("span", { class: `badge ${refused ? "bad" : "ok"}`, text: refused ? "refused" : "allowed" }),
    refused ? event.outcomeDesc || "" : "",
    consent ? short(consent.what.reference.replace("Consent/", "")) : "—",
    event.source?.site || "",
  ];
}

async function showTrail() {
  if (!enrolled.fingerprint) {
    fill("#trail", el("p", { text: "Enroll a key first." }));
    fill("#where", el("p", { text: me.institution }));
    return;
  }
  trail = await api("/fhir/AuditEvent");
  const events = (trail.entry || []).map((e) => e.resource);
  events.sort((a, b) => Date.parse(b.recorded) - Date.parse(a.recorded));
  fill("#trail", table("Every access, newest first", ["When", "Who", "What", "Record", "Outcome", "Why refused", "Under consent", "Recorded on"],
    events.map(eventRow)));
  const holders = new Set([me.institution]);
  for (const event of events) {
    const observer = member(event.source?.observer);
    if (observer) holders.add(observer);
  }
  fill("#where", el("ul", {}, [...holders].sort().map((h) =>
    el("li", { text: h === me.institution ? `${h} (you are signed in here)` : h }))));
}

function download() {
  if (!trail) return;
  const blob = new Blob([JSON.stringify(trail, null, 2)], { type: "application/fhir+json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "my-audit-trail.json" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function buildForm() {
  fill("#grantee", me.members.filter((m) => m !== me.institution).map((m) => el("option", { value: m, text: m })));
  fill("#purpose", Object.entries(PURPOSES).map(([code, text]) => el("option", { value: code, text })));
  fill("#scope", el("legend", { text: "Which records" }),
    el("label", {}, el("input", { type: "checkbox", name: "scope", value: "*", id: "scope-all", checked: true }), "All my records"),
    TYPES.map((t) => el("label", {}, el("input", { type: "checkbox", name: "scope", value: t, id: `scope-${t}` }), t)));
  const today = Date.now();
  $("#start").value = dateInput(today);
  $("#end").value = dateInput(today + 30 * DAY_MS);
  onSubmit($("#grant-form"), "#grant-status", grant);
  $("#refresh-trail").addEventListener("click", () => showTrail().catch((e) => say("#status", e.message, "error")));
  $("#download-trail").addEventListener("click", download);
}

async function refresh() {
  await showKey();
  await showConsents();
  await showTrail();
}

async function main() {
  me = await guard(["patient"]);
  if (!me) return;
  buildForm();
  try {
    await refresh();
  } catch (error) {
    say("#status", error.message, "error");
  }
}

main();
