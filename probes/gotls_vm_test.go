package probes

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/internal/vmtest"
	"github.com/clovisor/clovisor/probes/internal/gotlsdemo"
)

// TestGoTLSKernels runs the Go crypto/tls event tests in the VM kernels
// of the kernel matrix (Debian's 6.1 and 6.12) in each of their attach
// modes: the uprobes' cookies (bpf_get_attach_cookie, 5.15+) and the
// sockets' cookies as each mode makes them (the kprobe mode's scrambled
// addresses included) must give the same events as on the host. The
// demo programs are built on the host (the guest has no Go toolchain).
func TestGoTLSKernels(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("run from the host")
	}
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "ip")
	const guestDir = "/clovisor/gotls"
	// One build (the layouts of the releases are checked on the host).
	files := gotlsdemo.GuestFiles(t, guestDir, gotlsdemo.Variant{Stripped: true})
	bin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/probes")
	tests := []string{"TestGoTLSEvents/local-stripped", "TestGoTLSWriteWithHandshake"}
	pattern := `^(TestGoTLSEvents|TestGoTLSWriteWithHandshake)$/^local-stripped$`
	// uprobe_multi links came with Linux 6.6: 6.1 takes one uprobe per
	// place.
	for _, km := range []struct {
		series string
		multi  bool
	}{{"6.1", false}, {"6.12", true}} {
		series := km.series
		t.Run(series, func(t *testing.T) {
			t.Parallel()
			k := vmtest.LoadKernel(t, series)
			var runs []vmtest.GoTestRun
			for _, mode := range Modes {
				runs = append(runs, vmtest.GoTestRun{Name: mode, Binary: bin, Pattern: pattern,
					Env: map[string]string{"CLOVISOR_TEST_MODE": mode}})
			}
			_, results := vmtest.RunGoTests(t, k, runs, vmtest.Options{
				Env:      map[string]string{"CI": "true", gotlsdemo.EnvPrebuilt: guestDir},
				Files:    files,
				Programs: []string{"ip"},
				CPUs:     1,
				Timeout:  time.Duration(len(runs)) * 120 * time.Second,
			})
			for _, r := range results {
				if want := fmt.Sprintf("uprobe_multi=%v", km.multi); !strings.Contains(r.Output, want) {
					t.Errorf("%s, %s mode: the prober did not log %s", k, r.Name, want)
				}
				for _, name := range tests {
					if !regexp.MustCompile(`(?m)^\s*--- PASS: ` + regexp.QuoteMeta(name) + ` `).MatchString(r.Output) {
						t.Errorf("%s, %s mode: %s did not pass", k, r.Name, name)
					}
				}
			}
		})
	}
}
