// The auditor's and operator's page: network status, "verify now", the chain
// explorer (blocks and transactions as the chain holds them, anchors with their
// consistency proofs, finality certificates, equivocation evidence), benchmarks.

import { api } from "./session.js";
import { $, el, fill, guard, onSubmit, say, short, table, when } from "./ui.js";

async function readiness() {
  const response = await fetch("/readyz", { cache: "no-store" });
  return response.json();
}

async function network() {
  const [ready, status] = await Promise.all([readiness(), api("/chain/consortium/status").catch(() => null)]);
  const parts = [
    table("This node", ["Institution", "Readiness", "Private chain height", "Consortium height"], [[
      ready.institution,
      el("span", { class: `badge ${ready.status === "ready" ? "ok" : "bad"}`, text: ready.status }),
      String(ready.private_height),
      ready.consortium_height === undefined ? "—" : String(ready.consortium_height),
    ]]),
  ];
  if (ready.problems) {
    parts.push(el("ul", {}, Object.entries(ready.problems).map(([k, v]) => el("li", { text: `${k}: ${v}` }))));
  }
  if (status) {
    const anchors = status.anchors || {};
    parts.push(table(`Consortium ${status.consortium}: final height ${status.final_height}`,
      ["Member", "Last anchored private height", "Log size", "Log root", "Private block"],
      status.members.map((m) => {
        const a = anchors[m];
        return [m, a ? String(a.height) : "none yet", a ? String(a.log_size) : "—",
          a ? el("code", { text: short(a.log_root, 16) }) : "—", a ? el("code", { text: short(a.block_hash, 16) }) : "—"];
      })));
    const evidence = status.evidence || [];
    parts.push(evidence.length
      ? table("Equivocation evidence", ["Member", "Height", "Evidence"], evidence.map((e) => [e.member, String(e.height), el("pre", { tabindex: "0", text: JSON.stringify(e, null, 2) })]))
      : el("p", {}, el("span", { class: "badge ok", text: "no equivocation evidence" })));
    if (status.diverged) parts.push(el("p", { class: "notice error", text: "This member's chain diverged from the consortium." }));
  }
  fill("#network", parts);
}

async function verifyNow() {
  say("#verify-status", "Verifying every block…");
  fill("#verify-report");
  let report;
  try {
    report = await api("/chain/verify", { method: "POST" });
  } catch (error) {
    // The node lets a verification start only as long after the last one as that took.
    if (error.status !== 429 || !error.retryAfterS || error.retryAfterS > 30) throw error;
    say("#verify-status", `The last verification ended just now; starting again in ${error.retryAfterS} s…`);
    await new Promise((done) => setTimeout(done, error.retryAfterS * 1000));
    report = await api("/chain/verify", { method: "POST" });
  }
  say("#verify-status", report.ok ? "Verified: no tampering found." : "TAMPERING FOUND: the chain does not verify.", report.ok ? "ok" : "error");
  fill("#verify-report", table("Verification report", ["Chain", "Result", "Covered / problem"], report.chains.map((c) => [
    c.chain,
    el("span", { class: `badge ${c.ok ? "ok" : "bad"}`, text: c.ok ? "verified" : "FAILED" }),
    c.ok
      ? `${c.blocks} blocks, ${c.log_size} transactions, log root ${short(c.log_root, 16)}, signed by ${short(c.signer, 16)}` +
        (c.checkpoints ? `, consistent with ${c.checkpoints} anchored root(s)` : "")
      : `${c.problem}${c.step ? ` [step ${c.step}]` : ""}`,
  ])));
}

function txRow(tx, index) {
  const extra = tx.type === "anchor"
    ? el("p", { text: `anchor of ${tx.body.institution} at private height ${tx.body.height}: ` +
        `consistency proof from log size ${tx.body.prev_size} to ${tx.body.log_size}, ${(tx.body.proof || []).length} node(s), checked by every member` })
    : null;
  return [String(index), tx.type, when(tx.time_ms), el("div", {}, extra, el("pre", { tabindex: "0", text: JSON.stringify(tx, null, 2) }))];
}

async function showBlock(which, height) {
  const block = await api(`/chain/${which}/blocks/${height}`);
  const h = block.header;
  $("#height").value = String(h.height);
  fill("#block",
    table(`Block ${h.height} of ${h.chain}`, ["Field", "Value"], [
      ["Hash", el("code", { text: block.hash || "" })],
      ["Previous block", el("code", { text: h.prev_hash })],
      ["Transactions", `${h.tx_count} (Merkle root ${short(h.tx_root, 16)})`],
      ["Log", `${h.log_size} entries, RFC 6962 root ${short(h.log_root, 16)}`],
      ["Cut", when(h.time_ms)],
      ["Proposer", h.proposer || "—"],
    ]),
    table(which === "consortium" ? "Finality certificate (member signatures)" : "Signatures", ["Signer", "Algorithm", "Signature"],
      (block.signatures || []).map((s) => [el("code", { text: short(s.signer, 16) }), s.alg, el("code", { text: short(s.sig, 24) })])),
    table("Transactions as the chain holds them", ["#", "Type", "Time", "Transaction"], (block.txs || []).map(txRow)),
    el("p", { class: "row" },
      el("button", { type: "button", class: "secondary", text: "Previous block", disabled: h.height === 0, onclick: () => explore(which, h.height - 1) }),
      el("button", { type: "button", class: "secondary", text: "Next block", onclick: () => explore(which, h.height + 1) })));
}

async function explore(which, height) {
  try {
    if (height === null) height = (await api(`/chain/${which}/head`)).height;
    await showBlock(which, height);
    say("#explore-status", "");
  } catch (error) {
    say("#explore-status", error.message, "error");
  }
}

async function main() {
  const me = await guard(["auditor", "admin"]);
  if (!me) return;
  onSubmit($("#verify-form"), "#verify-status", verifyNow);
  onSubmit($("#explore-form"), "#explore-status", async (data) => {
    const text = String(data.get("height") || "");
    await explore(String(data.get("which")), text === "" ? null : Number(text));
  });
  try {
    await network();
    await explore("private", null);
  } catch (error) {
    say("#status", error.message, "error");
  }
}

main();
