package probes

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/clovisor/clovisor/internal/testbed"
)

func TestOpenAttachesAndCloseRemovesEverything(t *testing.T) {
	testbed.RequireRoot(t)
	tr, err := Open(Options{Mode: ModeTracepoint})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Mode != ModeTracepoint {
		t.Errorf("mode %s", tr.Mode)
	}
	held, err := testbed.BPFObjectsOf(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(held.Progs) != 5 || len(held.Links) != 5 || len(held.Maps) < 4 {
		t.Errorf("holding %+v, want 5 programs, 5 links and the maps", held)
	}
	if len(tr.Programs()) != 5 {
		t.Errorf("Programs() = %v", tr.Programs())
	}
	loaded, err := LoadedPrograms()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range held.Progs {
		if _, ok := loaded[ebpf.ProgramID(id)]; !ok {
			t.Errorf("program %d not found by LoadedPrograms: %v", id, loaded)
		}
	}
	if tr.Events.Type() != ebpf.RingBuf || tr.Events.MaxEntries() != 8<<20 {
		t.Errorf("ring buffer %v of %d bytes", tr.Events.Type(), tr.Events.MaxEntries())
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if left := testbed.StillLoaded(held, 3*time.Second); left.Count() != 0 {
		t.Errorf("still loaded after Close: %+v", left)
	}
}

func TestAutoPicksAWorkingModeAndSaysWhy(t *testing.T) {
	testbed.RequireRoot(t)
	var log strings.Builder
	tr, err := Open(Options{Logger: testLogger(&log)})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	out := log.String()
	if !strings.Contains(out, "socket tracer attached") || !strings.Contains(out, "mode="+tr.Mode) {
		t.Errorf("log does not name the chosen mode:\n%s", out)
	}
	// Every better mode than the chosen one was refused with a reason.
	for _, m := range Modes {
		if m == tr.Mode {
			break
		}
		if !strings.Contains(out, "probe mode refused") || !strings.Contains(out, "mode="+m) {
			t.Errorf("log does not say why %s was refused:\n%s", m, out)
		}
	}
}

// TestForcedModes: a forced mode either works on this kernel or fails at
// start with an error naming the mode, the kernel and the missing feature.
func TestForcedModes(t *testing.T) {
	testbed.RequireRoot(t)
	// The kernel matrix names the modes its kernels are known to have.
	required := strings.Split(os.Getenv("CLOVISOR_REQUIRE_MODES"), ",")
	for _, m := range Modes {
		tr, err := Open(Options{Mode: m})
		if err != nil && slices.Contains(required, m) {
			t.Errorf("%s: required on this kernel, but: %v", m, err)
			continue
		}
		if err == nil {
			if tr.Mode != m || len(tr.Programs()) == 0 {
				t.Errorf("%s: opened as %s with %d programs", m, tr.Mode, len(tr.Programs()))
			}
			t.Logf("%s: works on Linux %s", m, KernelRelease())
			if err := tr.Close(); err != nil {
				t.Error(err)
			}
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, "probe mode "+m) || !strings.Contains(msg, KernelRelease()) || !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: error does not name the mode, kernel and missing feature: %v", m, err)
		}
		t.Logf("%s: %v", m, err)
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []Options{
		{Mode: "uprobe"},
		{PayloadBytes: MaxPayload + 1},
		{PayloadBytes: -1},
		{RingBytes: 12345},
	} {
		if _, err := Open(o); err == nil {
			t.Errorf("%+v: no error", o)
		} else {
			t.Logf("%+v: %v", o, err)
		}
	}
}
