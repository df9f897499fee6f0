// A webhook receiver for Herald that verifies signatures and ignores replays (Go, stdlib).
//
//	WEBHOOK_SECRETS=secret1[,secret2] go run receiver.go PORT
//
// Answers 204 (verified, processed), 200 (verified, already processed: a retry or a replay) or
// 401 (the signature does not verify, or a Standard Webhooks timestamp is outside the window),
// and prints each decision as one JSON line.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

const toleranceSeconds = 5 * 60

var (
	secrets    = strings.FieldsFunc(os.Getenv("WEBHOOK_SECRETS"), func(r rune) bool { return r == ',' })
	mu         sync.Mutex
	seenEvents = map[string]bool{} // in production: a table with a unique key on (endpoint, event id)
)

func sign(key, msg []byte) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write(msg)
	return mac.Sum(nil)
}

// X-CloudThinker-Signature: "sha256=" + hex HMAC-SHA256 of the raw body; during a rotation
// X-CloudThinker-Signature-Next carries the new secret's signature.
func cloudthinkerOK(body []byte, h http.Header) bool {
	presented := []string{h.Get("X-CloudThinker-Signature"), h.Get("X-CloudThinker-Signature-Next")}
	for _, secret := range secrets {
		expected := "sha256=" + hex.EncodeToString(sign([]byte(secret), body))
		for _, p := range presented {
			if p != "" && hmac.Equal([]byte(p), []byte(expected)) {
				return true
			}
		}
	}
	return false
}

// Standard Webhooks: HMAC-SHA256 over "id.timestamp.body", keyed by the base64 part of whsec_.
func standardOK(body []byte, h http.Header) bool {
	ts, err := strconv.ParseInt(h.Get("webhook-timestamp"), 10, 64)
	if err != nil || math.Abs(float64(time.Now().Unix()-ts)) > toleranceSeconds {
		return false
	}
	signed := append([]byte(fmt.Sprintf("%s.%d.", h.Get("webhook-id"), ts)), body...)
	for _, secret := range secrets {
		if !strings.HasPrefix(secret, "whsec_") {
			continue
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
		if err != nil {
			continue
		}
		expected := base64.StdEncoding.EncodeToString(sign(key, signed))
		for _, entry := range strings.Split(h.Get("webhook-signature"), " ") {
			_, sig, _ := strings.Cut(entry, ",")
			if sig != "" && hmac.Equal([]byte(sig), []byte(expected)) {
				return true
			}
		}
	}
	return false
}

func handle(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	answer := func(status int, outcome string, eventID any) {
		line, _ := json.Marshal(map[string]any{"path": r.URL.Path, "outcome": outcome, "event_id": eventID})
		fmt.Println(string(line))
		w.WriteHeader(status)
	}
	verified := cloudthinkerOK(body, r.Header)
	if r.Header.Get("webhook-signature") != "" {
		verified = standardOK(body, r.Header)
	}
	if !verified {
		answer(http.StatusUnauthorized, "rejected", nil)
		return
	}
	var envelope struct{ ID string }
	_ = json.Unmarshal(body, &envelope) // the id is also in X-CloudThinker-Event-Id
	key := r.URL.Path + " " + envelope.ID // one endpoint sees each event once
	mu.Lock()
	seen := seenEvents[key]
	seenEvents[key] = true
	mu.Unlock()
	if seen {
		answer(http.StatusOK, "duplicate", envelope.ID)
		return
	}
	// ... act on the event here ...
	answer(http.StatusNoContent, "processed", envelope.ID)
}

func main() {
	http.HandleFunc("/", handle)
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
