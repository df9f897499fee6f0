"""A webhook receiver for Herald that verifies signatures and ignores replays (Python 3, stdlib).

    WEBHOOK_SECRETS=secret1[,secret2] python3 receiver.py PORT

Each secret is a webhook's signing secret. During a rotation, list both: the receiver accepts a
request that any of them signed. It answers:
  204  verified and processed;
  200  verified, but this event was already processed (a retry or a replay: nothing is done twice);
  401  the signature does not verify, or a Standard Webhooks timestamp is outside the window.
Each decision is printed as one JSON line on stdout.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRETS = [s for s in os.environ.get("WEBHOOK_SECRETS", "").split(",") if s]
TOLERANCE_SECONDS = 5 * 60
seen_events = set()  # in production: a table with a unique key on (endpoint, event id)
lock = threading.Lock()  # requests are handled on several threads


def cloudthinker_ok(body, headers):
    """X-CloudThinker-Signature is `sha256=` + hex HMAC-SHA256 of the raw body. During a
    rotation X-CloudThinker-Signature-Next carries the new secret's signature."""
    presented = [headers.get("X-CloudThinker-Signature", ""), headers.get("X-CloudThinker-Signature-Next", "")]
    for secret in SECRETS:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if any(p and hmac.compare_digest(p, expected) for p in presented):
            return True
    return False


def standard_ok(body, headers):
    """Standard Webhooks: HMAC-SHA256 over `id.timestamp.body` keyed by the base64 part of a
    `whsec_` secret; the signed timestamp must be recent, which defeats replays of old requests."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    presented = [entry.partition(",")[2] for entry in headers.get("webhook-signature", "").split(" ")]
    for secret in SECRETS:
        if not secret.startswith("whsec_"):
            continue
        key = base64.b64decode(secret[len("whsec_"):])
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        if any(p and hmac.compare_digest(p, expected) for p in presented):
            return True
    return False


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if "webhook-signature" in self.headers:
            verified = standard_ok(body, self.headers)
        else:
            verified = cloudthinker_ok(body, self.headers)
        if not verified:
            return self.answer(401, "rejected", None)
        event_id = json.loads(body)["id"]  # also in X-CloudThinker-Event-Id
        key = (self.path, event_id)  # one endpoint sees each event once
        with lock:
            duplicate = key in seen_events
            seen_events.add(key)
        if duplicate:
            return self.answer(200, "duplicate", event_id)
        # ... act on the event here ...
        self.answer(204, "processed", event_id)

    def answer(self, status, outcome, event_id):
        with lock:
            print(json.dumps({"path": self.path, "outcome": outcome, "event_id": event_id}), flush=True)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver)
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()
