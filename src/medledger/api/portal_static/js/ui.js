// DOM helpers. Text from the network is only ever set as textContent, never as
// markup: a record or an error message cannot inject anything into the page.

import { HOME, signOut, whoAmI } from "./session.js";

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function $(selector) {
  return document.querySelector(selector);
}

export function fill(target, ...children) {
  const node = typeof target === "string" ? $(target) : target;
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export function when(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function short(hexText, n = 12) {
  return hexText ? `${String(hexText).slice(0, n)}…` : "—";
}

// A status line announced to screen readers (role=status / role=alert).
export function say(target, message, kind = "info") {
  const node = typeof target === "string" ? $(target) : target;
  node.className = `notice ${kind}`;
  node.setAttribute("role", kind === "error" ? "alert" : "status");
  node.textContent = message;
}

export function table(caption, headings, rows) {
  return el(
    "table",
    {},
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col", text: h })))),
    el(
      "tbody",
      {},
      rows.length
        ? rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))
        : el("tr", {}, el("td", { colspan: headings.length, text: "none" })),
    ),
  );
}

// A labelled field: <label for=id> plus the control.
export function field(label, control, hint) {
  const hintNode = hint ? el("span", { class: "hint", id: `${control.id}-hint`, text: hint }) : null;
  if (hintNode) control.setAttribute("aria-describedby", hintNode.id);
  return el("div", { class: "field" }, el("label", { for: control.id, text: label }), control, hintNode);
}

// Load the session for a page of `roles`; others go back to the sign-in page.
export async function guard(roles) {
  const me = await whoAmI();
  if (!me || !roles.includes(me.role)) {
    location.replace(me ? HOME[me.role] || "/portal/index.html" : "/portal/index.html");
    return null;
  }
  const who = $("#who");
  if (who) {
    fill(
      who,
      el("span", { text: `${me.role} at ${me.institution}` }),
      el("button", {
        type: "button",
        class: "link",
        text: "Sign out",
        onclick: () => {
          signOut();
          location.assign("/portal/index.html");
        },
      }),
    );
  }
  return me;
}

// Run an async form action: disable the submit button meanwhile, report errors in `status`.
export function onSubmit(form, status, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    try {
      await action(new FormData(form));
    } catch (error) {
      say(status, error.message || String(error), "error");
    } finally {
      if (button) button.disabled = false;
    }
  });
}
