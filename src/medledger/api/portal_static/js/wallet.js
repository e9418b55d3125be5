// The patient's key in this browser: an ECDSA P-256 key pair made by WebCrypto with
// a non-extractable private key, kept in IndexedDB (a CryptoKey is stored as an
// object; its private bytes never reach script). On chains the patient is the
// SHA-256 fingerprint of the public key's DER SubjectPublicKeyInfo.

import { canonicalBytes, hex, p1363ToDer, sha256Hex } from "./canonical.js";

const DB = "medledger-wallet";
const STORE = "keys";
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
  constructor(keys, spki) {
    this.keys = keys;
    this.publicDerHex = hex(spki);
    this.spki = spki;
  }

  async fingerprint() {
    return sha256Hex(this.spki);
  }

  // {signer, alg, sig}: the signature format of docs/formats.md over `message` bytes.
  async sign(message) {
    const raw = await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, this.keys.privateKey, message);
    return { signer: await this.fingerprint(), alg: "ecdsa-p256-sha256", sig: hex(p1363ToDer(raw)) };
  }

  // A transaction signed as the chains hold it: the signature over its canonical bytes.
  async signTx(tx) {
    return { ...tx, signatures: [await this.sign(canonicalBytes(tx))] };
  }
}

// The key kept for `slot` (institution and Patient), or null.
export async function loadWallet(slot) {
  const keys = await request("readonly", (s) => s.get(slot));
  if (!keys) return null;
  return new Wallet(keys, await crypto.subtle.exportKey("spki", keys.publicKey));
}

// A new non-extractable key for `slot`, stored before it is used.
export async function createWallet(slot) {
  const keys = await crypto.subtle.generateKey(ALG, false, ["sign", "verify"]);
  await request("readwrite", (s) => s.put(keys, slot));
  return new Wallet(keys, await crypto.subtle.exportKey("spki", keys.publicKey));
}
