// A webhook receiver for Herald that verifies signatures and ignores replays (Node.js, no packages).
//
//     WEBHOOK_SECRETS=secret1[,secret2] node receiver.js PORT
//
// Answers 204 (verified, processed), 200 (verified, already processed: a retry or a replay) or
// 401 (the signature does not verify, or a Standard Webhooks timestamp is outside the window),
// and prints each decision as one JSON line.
const crypto = require("node:crypto");
const http = require("node:http");

const SECRETS = (process.env.WEBHOOK_SECRETS || "").split(",").filter(Boolean);
const TOLERANCE_SECONDS = 5 * 60;
const seenEvents = new Set(); // in production: a table with a unique key on (endpoint, event id)

function same(a, b) {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

// X-CloudThinker-Signature: "sha256=" + hex HMAC-SHA256 of the raw body; during a rotation
// X-CloudThinker-Signature-Next carries the new secret's signature.
function cloudthinkerOk(body, headers) {
  const presented = [headers["x-cloudthinker-signature"], headers["x-cloudthinker-signature-next"]].filter(Boolean);
  return SECRETS.some((secret) => {
    const expected = "sha256=" + crypto.createHmac("sha256", secret).update(body).digest("hex");
    return presented.some((p) => same(p, expected));
  });
}

// Standard Webhooks: HMAC-SHA256 over "id.timestamp.body", keyed by the base64 part of whsec_.
function standardOk(body, headers) {
  const id = headers["webhook-id"] || "";
  const timestamp = headers["webhook-timestamp"] || "";
  if (!/^\d+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_SECONDS) {
    return false;
  }
  const presented = (headers["webhook-signature"] || "").split(" ").map((e) => e.split(",")[1] || "");
  return SECRETS.filter((s) => s.startsWith("whsec_")).some((secret) => {
    const key = Buffer.from(secret.slice("whsec_".length), "base64");
    const expected = crypto
      .createHmac("sha256", key)
      .update(Buffer.concat([Buffer.from(`${id}.${timestamp}.`), body]))
      .digest("base64");
    return presented.some((p) => same(p, expected));
  });
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const answer = (status, outcome, eventId) => {
      console.log(JSON.stringify({ path: req.url, outcome, event_id: eventId }));
      res.writeHead(status, { "Content-Length": "0" }).end();
    };
    const verified = "webhook-signature" in req.headers ? standardOk(body, req.headers) : cloudthinkerOk(body, req.headers);
    if (!verified) return answer(401, "rejected", null);
    const eventId = JSON.parse(body).id; // also in X-CloudThinker-Event-Id
    const key = `${req.url} ${eventId}`; // one endpoint sees each event once
    if (seenEvents.has(key)) return answer(200, "duplicate", eventId);
    seenEvents.add(key);
    // ... act on the event here ...
    answer(204, "processed", eventId);
  });
});

server.listen(Number(process.argv[2]), "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});
