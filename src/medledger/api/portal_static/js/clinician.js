// The clinician's page: find a patient (a POST search: no patient detail in a URL),
// read their records each with a verified provenance badge, and fetch a record from
// another institution under the patient's consent, verified before it is shown.

import { api } from "./session.js";
import { $, el, fill, guard, onSubmit, say, short, table, when } from "./ui.js";

function patientName(patient) {
  const name = (patient.name || [])[0] || {};
  return name.text || [...(name.given || []), name.family || ""].join(" ").trim() || "(no name)";
}

function summary(resource) {
  const concept = resource.code || resource.type?.[0] || resource.medicationCodeableConcept || {};
  const text = concept.text || concept.coding?.[0]?.display || concept.coding?.[0]?.code || "";
  const value = resource.valueQuantity
    ? ` = ${resource.valueQuantity.value} ${resource.valueQuantity.unit || ""}`
    : "";
  const date = resource.effectiveDateTime || resource.recordedDate || resource.period?.start || resource.onsetDateTime || "";
  return `${text}${value}${date ? ` (${date.slice(0, 10)})` : ""}`;
}

// The badge of a verified provenance: chain, block, anchor, certificate.
export function provenanceBadge(p) {
  if (!p.anchored) {
    return el("span", { class: "badge wait", text: `block ${p.block} of ${p.chain} · not anchored yet` });
  }
  const signers = (p.certified_by || []).join(", ");
  const detail = `block ${p.block} of ${p.chain} · anchored in consortium block ${p.consortium_height} at ${when(p.anchored_ms)}`;
  if (!p.verified) {
    return el("span", { class: "badge bad", text: `NOT VERIFIED: ${p.problem} · ${detail}` });
  }
  return el("span", { class: "badge ok", text: `✓ verified · ${detail} · final, certified by ${signers}` });
}

async function records(patient) {
  say("#status", `Loading the records of ${patientName(patient)}…`);
  // One $everything read (audited per resource, as every read is): the Patient first,
  // then its compartment and what that refers to.
  const bundle = await api(`/fhir/Patient/${encodeURIComponent(patient.id)}/$everything?_count=200`);
  const rows = (bundle.entry || []).map((e) => e.resource).filter((r) => r && !(r.resourceType === "Patient" && r.id === patient.id));
  const cells = [];
  for (const resource of [patient, ...rows]) {
    const badge = el("span", { class: "badge wait", text: "checking…" });
    cells.push([`${resource.resourceType}/${resource.id}`, resource.resourceType === "Patient" ? patientName(resource) : summary(resource),
      `v${resource.meta?.versionId || "?"}`, badge]);
    api(`/fhir/${resource.resourceType}/${resource.id}/$provenance`)
      .then((p) => badge.replaceWith(provenanceBadge(p)))
      .catch((error) => badge.replaceWith(el("span", { class: "badge bad", text: error.message })));
  }
  fill("#records", table(`Records of ${patientName(patient)} here`, ["Record", "What", "Version", "Provenance"], cells));
  say("#status", `${cells.length} records of ${patientName(patient)}.`, "ok");
}

async function find(data) {
  const form = {};
  for (const key of ["name", "identifier", "birthdate"]) {
    const value = String(data.get(key) || "").trim();
    if (value) form[key] = value;
  }
  if (!Object.keys(form).length) throw new Error("Give a name, an identifier or a birth date.");
  form._count = "20";
  const bundle = await api("/fhir/Patient/_search", { method: "POST", form });
  const patients = (bundle.entry || []).map((e) => e.resource);
  fill("#patients", table("Patients found", ["Name", "Birth date", "Record id", ""], patients.map((p) => [
    patientName(p), p.birthDate || "—", el("code", { text: p.id }),
    el("button", { type: "button", class: "secondary", text: "Open records", "aria-label": `Open the records of ${patientName(p)}`,
      onclick: () => records(p).catch((e) => say("#status", e.message, "error")) }),
  ])));
  say("#status", `${patients.length} patient(s) found.`, patients.length ? "ok" : "info");
}

function sharedProvenance(p) {
  return table("Verification", ["Check", "Result"], [
    ["Holder", p.holder],
    ["Record version", `${p.resource} v${p.version}`],
    ["Record transaction", el("code", { text: p.record_tx })],
    ["In the holder's log", `entry ${p.leaf_index} of ${p.anchored_log_size} (root ${short(p.anchored_log_root, 16)})`],
    ["Anchor", `consortium block ${p.consortium_height} (${short(p.consortium_block, 16)})`],
    ["Finality certificate", (p.certified_by || []).join(", ")],
    ["Data key wrapped with", p.kem],
    ["Consent", el("code", { text: p.consent })],
  ]);
}

async function share(data) {
  const holder = String(data.get("holder"));
  const consent = String(data.get("consent")).trim();
  const target = String(data.get("target") || "").trim();
  fill("#shared");
  if (!target) {
    const listed = await api(`/share/${encodeURIComponent(holder)}?consent=${consent}`);
    fill("#shared", table(`What consent ${short(consent)} lets this institution fetch from ${holder}`, ["Record", ""],
      listed.entries.map((entry) => [entry, el("button", { type: "button", class: "secondary", text: "Fetch", "aria-label": `Fetch ${entry}`,
        onclick: () => { $("#target").value = entry; $("#share-form").requestSubmit(); } })])));
    say("#share-status", `${listed.entries.length} record(s) covered.`, "ok");
    return;
  }
  const [type, id] = target.split("/");
  if (!/^[A-Z][A-Za-z]+$/.test(type || "") || !/^[A-Za-z0-9.-]{1,64}$/.test(id || "")) {
    throw new Error("The record is Type/id, e.g. Observation/123.");
  }
  say("#share-status", `Fetching ${target} from ${holder}…`);
  try {
    const shared = await api(`/share/${encodeURIComponent(holder)}/${type}/${id}?consent=${consent}`);
    say("#share-status", `Verified: ${target} from ${holder} is the record ${holder} committed and anchored.`, "ok");
    fill("#shared", el("p", {}, el("span", { class: "badge ok", text: "✓ verified" }), ` ${summary(shared.resource) || target}`),
      sharedProvenance(shared.provenance), el("details", {}, el("summary", { text: "The record" }),
        el("pre", { tabindex: "0", text: JSON.stringify(shared.resource, null, 2) })));
  } catch (error) {
    say("#share-status", `Refused: ${error.message}`, "error");
    fill("#shared", el("p", {}, el("span", { class: "badge bad", text: "refused" }), ` ${error.message}`));
  }
}

async function main() {
  const me = await guard(["clinician", "admin"]);
  if (!me) return;
  fill("#holder", me.members.filter((m) => m !== me.institution).map((m) => el("option", { value: m, text: m })));
  onSubmit($("#find-form"), "#status", find);
  onSubmit($("#share-form"), "#share-status", share);
}

main();
