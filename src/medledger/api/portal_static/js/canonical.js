// Canonical JSON (docs/formats.md): keys sorted, no whitespace, non-ASCII kept as is,
// integers only. What the node hashes and what a patient's key signs; the node
// re-encodes every transaction it is given and refuses one whose bytes differ.

export function canonical(value) {
  if (value === null || typeof value === "boolean" || typeof value === "string") {
    return JSON.stringify(value);
  }
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new Error("canonical JSON holds integers only");
    return String(value);
  }
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  if (typeof value === "object") {
    // Python sorts str keys by code point; the keys we write are ASCII, where the
    // UTF-16 order JavaScript sorts by is the same.
    const keys = Object.keys(value).sort();
    return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
  }
  throw new Error("not a JSON value");
}

export function canonicalBytes(value) {
  return new TextEncoder().encode(canonical(value));
}

export function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256Hex(bytes) {
  return hex(await crypto.subtle.digest("SHA-256", bytes));
}

// WebCrypto signs ECDSA as r‖s (IEEE P1363); signatures on the chains are DER (RFC 3279).
function derInteger(bytes) {
  let i = 0;
  while (i < bytes.length - 1 && bytes[i] === 0) i += 1;
  let body = Array.from(bytes.slice(i));
  if (body[0] & 0x80) body = [0, ...body];
  return [0x02, body.length, ...body];
}

export function p1363ToDer(signature) {
  const raw = new Uint8Array(signature);
  const half = raw.length / 2;
  const seq = [...derInteger(raw.slice(0, half)), ...derInteger(raw.slice(half))];
  return new Uint8Array([0x30, seq.length, ...seq]);
}
