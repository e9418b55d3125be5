// Patient sign-in: sign the server's challenge with the wallet key held in this browser.
//
// The key is a WebCrypto ECDSA P-256 private key imported as NON-extractable and kept in
// IndexedDB: scripts of this origin can use it to sign but never read it out. It arrives
// once, from the JWK file `medledger patient export-key --for-browser` writes; that file
// should be deleted after the import. WebCrypto signatures are IEEE P1363 (r||s); the
// server converts them. No inline script: the page's CSP allows only this file.
"use strict";

const DB_NAME = "medledger";
const STORE = "keys";
const KEY_NAME = "wallet";
const ALG = { name: "ECDSA", namedCurve: "P-256" };

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function loadKey() {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const get = db.transaction(STORE, "readonly").objectStore(STORE).get(KEY_NAME);
    get.onsuccess = () => resolve(get.result || null);
    get.onerror = () => reject(get.error);
  });
}

async function saveKey(entry) {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, "readwrite");
    tx.objectStore(STORE).put(entry, KEY_NAME);
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
  });
}

function base64url(buffer) {
  let text = "";
  for (const byte of new Uint8Array(buffer)) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function importJwk(jwk) {
  if (jwk.kty !== "EC" || jwk.crv !== "P-256" || !jwk.d) {
    throw new Error("this file is not a P-256 private key from medledger");
  }
  const privateKey = await crypto.subtle.importKey(
    "jwk", { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y, d: jwk.d }, ALG, false, ["sign"]);
  const publicKey = await crypto.subtle.importKey(
    "jwk", { kty: "EC", crv: "P-256", x: jwk.x, y: jwk.y }, ALG, true, ["verify"]);
  const spki = await crypto.subtle.exportKey("spki", publicKey);
  const entry = { privateKey, spki };
  await saveKey(entry);
  return entry;
}

async function signIn(entry) {
  const main = document.getElementById("signin");
  const message = new TextEncoder().encode(main.dataset.message);
  const signature = await crypto.subtle.sign(
    { name: "ECDSA", hash: "SHA-256" }, entry.privateKey, message);
  document.getElementById("public_key").value = base64url(entry.spki);
  document.getElementById("signature").value = base64url(signature);
  document.getElementById("patient-form").submit();
}

function say(text) {
  document.getElementById("patient-status").textContent = text;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("use-browser-key").addEventListener("click", async () => {
    try {
      const entry = await loadKey();
      if (!entry) {
        say("No key in this browser yet: import your browser key file below.");
        return;
      }
      await signIn(entry);
    } catch (error) {
      say("Signing failed: " + error.message);
    }
  });
  document.getElementById("key-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    try {
      const entry = await importJwk(JSON.parse(await file.text()));
      say("Key imported into this browser (you can delete the file now). Signing in…");
      await signIn(entry);
    } catch (error) {
      say("Import failed: " + error.message);
    }
  });
});
