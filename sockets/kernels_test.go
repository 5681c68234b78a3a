package sockets_test

import (
	"encoding/json"
	"maps"
	"regexp"
	"slices"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/internal/vmtest"
)

// The kernel matrix: besides the host's kernel (tracepoint mode, the
// other tests of this package), Debian's 6.1 and 6.12 cloud kernels
// booted under qemu, each running the probes tests and the socket tests
// (mode equivalence and the tracker's tests) in every mode they have. The
// sessions of the scripted workload must be the same in every mode on
// every kernel, the host's included.
var kernelMatrix = []struct {
	series string
	modes  string // modes the kernel must allow (CLOVISOR_REQUIRE_MODES)
}{
	{"6.1", "kprobe,fentry,tracepoint"}, // tracepoint through syscall trace events (no sock_*_length before 6.3)
	{"6.12", "kprobe,fentry,tracepoint"},
}

var modeResultRE = regexp.MustCompile(`MODE-RESULT (\w+) (\[.*\])`)

func TestKernelMatrix(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("the matrix is run from the host")
	}
	testbed.RequireRoot(t)
	probesBin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/probes")
	socketsBin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/sockets")

	// kernel/mode -> sessions
	all := map[string][]sessionKey{}
	for mode, keys := range runModeEquivalence(t) {
		all["host/"+mode] = keys
	}
	for _, km := range kernelMatrix {
		t.Run(km.series, func(t *testing.T) {
			k := vmtest.LoadKernel(t, km.series)
			opts := vmtest.Options{Env: map[string]string{"CLOVISOR_REQUIRE_MODES": km.modes, "CI": "true"}}
			vmtest.RunGoTest(t, k, probesBin, "^(TestForcedModes|TestBadOptions)$", opts)
			res := vmtest.RunGoTest(t, k, socketsBin,
				"^(TestModeEquivalence|TestServerSessionFromEvents|TestRoleFromPayload|TestLostEventsBecomeGaps|TestGarbageIsCountedNotExported|TestTableIsBoundedAndExpires|TestReorderedEventIsDropped|TestIPv6MappedAddresses)$", opts)
			found := 0
			for _, m := range modeResultRE.FindAllStringSubmatch(res.Output, -1) {
				var keys []sessionKey
				if err := json.Unmarshal([]byte(m[2]), &keys); err != nil {
					t.Fatalf("guest result %q: %v", m[0], err)
				}
				all[km.series+"/"+m[1]] = keys
				found++
			}
			if want := len(regexp.MustCompile(`,`).FindAllString(km.modes, -1)) + 1; found < want {
				t.Errorf("%d modes reported results on %s, want at least %d:\n%s", found, km.series, want, res.Output)
			}
			t.Logf("%s: booted in %v, ran in %v", k, res.GuestBoot, res.GuestRun)
		})
	}
	names := slices.Sorted(maps.Keys(all))
	t.Logf("compared: %v", names)
	for _, name := range names[1:] {
		if !slices.Equal(all[name], all[names[0]]) {
			t.Errorf("%s differs from %s:\n%+v\n%+v", name, names[0], all[name], all[names[0]])
		}
	}
	if len(names) < 6 {
		t.Errorf("only %d kernel/mode runs: %v", len(names), names)
	}
}

// BenchmarkKernelMatrixModeCost runs BenchmarkModeCost inside each VM
// kernel and reports its figures (software-emulated CPU: compare the modes
// with each other, not with the host).
func BenchmarkKernelMatrixModeCost(b *testing.B) {
	if vmtest.InGuest() {
		b.Skip("the matrix is run from the host")
	}
	testbed.RequireRoot(b)
	bin := vmtest.BuildTestBinary(b, "github.com/clovisor/clovisor/sockets")
	for _, km := range kernelMatrix {
		b.Run(km.series, func(b *testing.B) {
			k := vmtest.LoadKernel(b, km.series)
			res := vmtest.Run(b, k, vmtest.Options{
				Args:  []string{"/clovisor/guest.test", "-test.run=^$", "-test.bench=^BenchmarkModeCost$", "-test.benchtime=2000x"},
				Files: map[string]string{"/clovisor/guest.test": bin},
				Env:   map[string]string{"CI": "true"},
			})
			for _, line := range regexp.MustCompile(`(?m)^BenchmarkModeCost/.*$`).FindAllString(res.Output, -1) {
				b.Log(line)
			}
		})
	}
}
