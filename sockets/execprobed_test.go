package sockets

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
)

// Clients that per-process TLS tracing must see from their first SSL call
// run through testbed's exec wrapper (testbed.EnvExecProbed).

// ProbedIn reports whether TLS tracing has probed process pid in each of
// files.
func ProbedIn(t testing.TB, tt *probes.TLSTracer, files ...string) func(pid int) bool {
	t.Helper()
	want := map[uint64]bool{}
	for _, f := range files {
		want[testbed.Inode(t, f)] = true
	}
	return func(pid int) bool {
		got := map[uint64]bool{}
		for _, a := range tt.Active() {
			if a.PID == pid && want[a.Inode] {
				got[a.Inode] = true
			}
		}
		return len(got) == len(want)
	}
}

// ProbedClient is HTTPPair.Client for a client run through the exec
// wrapper, probed in files before it starts.
func ProbedClient(t *testing.T, tt *probes.TLSTracer, p *testbed.TLSPair, env []string, files []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	self, wargs := testbed.ProbedArgs(t, name, args...)
	cmd, start := p.ClientCommand(ctx, self, wargs...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := testbed.ProbedStart(t, cmd, start, ProbedIn(t, tt, files...), files...)(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// SystemLibssl is the machine's libssl.so.3, which curl and nginx use
// (where ldd finds it: the VM kernels' guests have their libraries there).
const SystemLibssl = "/lib/x86_64-linux-gnu/libssl.so.3"
