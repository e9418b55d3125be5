// The patient's key in this browser: an ECDSA P-256 private key that WebCrypto holds
// as non-extractable, kept in IndexedDB (a CryptoKey is stored as an object; its
// private bytes never reach script) with its public key's DER SubjectPublicKeyInfo.
// The entry is the one the node's sign-in page uses (decision 0039: database
// "medledger", store "keys", entry "wallet" = {privateKey, spki}), so a key imported
// there signs consents here, and a key made here signs in there. On chains the
// patient is the SHA-256 fingerprint of that SPKI.

import { canonicalBytes, hex, p1363ToDer, sha256Hex } from "./canonical.js";

const DB = "medledger";
const STORE = "keys";
const ENTRY = "wallet";
const ALG = { name: "ECDSA", namedCurve: "P-256" };

function database() {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(STORE);
    open.onsuccess = () => resolve(open.result);
    open.onerror = () => reject(open.error);
  });
}

async function request(mode, work) {
  const db = await database();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

export class Wallet {
  constructor(privateKey, spki) {
    this.privateKey = privateKey;
    this.publicDerHex = hex(spki);
    this.spki = spki;
  }

  async fingerprint() {
    return sha256Hex(this.spki);
  }

  // {signer, alg, sig}: the signature format of docs/formats.md over `message` bytes.
  async sign(message) {
    const raw = await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, this.privateKey, message);
    return { signer: await this.fingerprint(), alg: "ecdsa-p256-sha256", sig: hex(p1363ToDer(raw)) };
  }

  // A transaction signed as the chains hold it: the signature over its canonical bytes.
  async signTx(tx) {
    return { ...tx, signatures: [await this.sign(canonicalBytes(tx))] };
  }
}

// The key this browser holds, or null.
export async function loadWallet() {
  const entry = await request("readonly", (s) => s.get(ENTRY));
  if (!entry || !entry.privateKey || !entry.spki) return null;
  return new Wallet(entry.privateKey, entry.spki);
}

// A new key with a non-extractable private part, stored before it is used.
export async function createWallet() {
  const keys = await crypto.subtle.generateKey(ALG, false, ["sign", "verify"]);
  const spki = await crypto.subtle.exportKey("spki", keys.publicKey);
  await request("readwrite", (s) => s.put({ privateKey: keys.privateKey, spki }, ENTRY));
  return new Wallet(keys.privateKey, spki);
}
