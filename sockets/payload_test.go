package sockets

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
)

// EnvPayloadSender makes the test binary send one message (see
// PayloadSender).
const EnvPayloadSender = "CLOVISOR_TEST_PAYLOAD_SENDER"

// payloadMessage is the 1000-byte message of a tag: no two tags' first 300
// bytes are the same.
func payloadMessage(tag string) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < 1000; i++ {
		fmt.Fprintf(&b, "%s-%04d;", tag, i)
	}
	return b.Bytes()[:1000]
}

// PayloadSender, for the spec "ADDR TAG", connects to ADDR and writes
// payloadMessage(TAG) in one call, then waits for the peer to close (or
// 2 s).
func PayloadSender(spec string) int {
	addr, tag, _ := strings.Cut(spec, " ")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	if _, err := c.Write(payloadMessage(tag)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			return 0
		}
	}
}

// TestPayloadBytesLive checks that SetPayloadBytes changes the payload
// prefix of the running programs: a 1000-byte message sent with the prefix
// at 64 arrives as a data event of cap 64 with the message's first 64
// bytes; after SetPayloadBytes(300), the next message's event has cap 300
// and its first 300 bytes. An out-of-range size is refused and changes
// nothing.
func TestPayloadBytesLive(t *testing.T) {
	p := testbed.NewHTTPPair(t)
	mode := AttachModeUnderTest(t)
	tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true, PayloadBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Mode != mode {
		t.Fatalf("tracer attached in mode %s, asked for %s", tr.Mode, mode)
	}
	if err := tr.AddCgroup(p.ClientCG.ID()); err != nil {
		t.Fatal(err)
	}
	rd, err := ringbuf.NewReader(tr.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	server := fmt.Sprintf("%s:%d", p.ServerIP, p.Port)

	// send runs a client that sends tag's message and returns the data
	// event of its send: exactly one event for the 1000 bytes.
	send := func(tag string) (probes.DataEvent, []byte) {
		t.Helper()
		p.Client(t, []string{EnvPayloadSender + "=" + server + " " + tag}, exe)
		var got []probes.DataEvent
		var payloads [][]byte
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
			rec, err := rd.Read()
			if err != nil {
				if len(got) > 0 {
					break // the ring is drained
				}
				continue
			}
			if rec.RawSample[0] != probes.EventData {
				continue
			}
			var ev probes.DataEvent
			data, err := decodeData(rec.RawSample, &ev)
			if err != nil {
				t.Fatal(err)
			}
			if ev.Dir == probes.DirSend {
				got = append(got, ev)
				payloads = append(payloads, bytes.Clone(data))
			}
		}
		if len(got) != 1 {
			t.Fatalf("message %s: %d send events, want 1", tag, len(got))
		}
		return got[0], payloads[0]
	}
	check := func(tag string, wantCap int) {
		t.Helper()
		ev, data := send(tag)
		msg := payloadMessage(tag)
		if ev.Len != 1000 || int(ev.Cap) != wantCap || !bytes.Equal(data, msg[:wantCap]) {
			t.Fatalf("message %s: len %d cap %d payload %q, want len 1000 cap %d payload %q", tag, ev.Len, ev.Cap, data, wantCap, msg[:wantCap])
		}
	}

	check("first", 64)
	if err := tr.SetPayloadBytes(300); err != nil {
		t.Fatal(err)
	}
	if got := tr.PayloadBytes(); got != 300 {
		t.Fatalf("PayloadBytes() = %d after SetPayloadBytes(300)", got)
	}
	check("second", 300)

	err = tr.SetPayloadBytes(probes.MaxPayload + 1)
	want := fmt.Sprintf("payload prefix %d bytes: must be between 0 and %d", probes.MaxPayload+1, probes.MaxPayload)
	if err == nil || err.Error() != want {
		t.Fatalf("SetPayloadBytes(MaxPayload+1) = %v, want error %q", err, want)
	}
	if err := tr.SetPayloadBytes(-1); err == nil {
		t.Fatal("SetPayloadBytes(-1) accepted")
	}
	if got := tr.PayloadBytes(); got != 300 {
		t.Fatalf("PayloadBytes() = %d after refused sizes, want 300", got)
	}
	check("third", 300)
}
