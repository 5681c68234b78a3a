package sockets_test

import (
	"encoding/json"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/internal/vmtest"
	"github.com/clovisor/clovisor/sockets"
)

// The kernel matrix: besides the host's kernel (tracepoint mode, the
// other tests of this package), Debian's 6.1 and 6.12 cloud kernels
// booted under qemu, each running the probes tests and the socket tests
// (mode equivalence and the tracker's tests) in every mode they have, and
// the core socket tests (real nginx, curl and a Go client in network
// namespaces and cgroups) once per mode. The sessions of the scripted
// workload must be the same in every mode on every kernel, the host's
// included.
var kernelMatrix = []struct {
	series string
	modes  []string // modes the kernel must allow (CLOVISOR_REQUIRE_MODES)
}{
	{"6.1", []string{"kprobe", "fentry", "tracepoint"}}, // tracepoint through syscall trace events (no sock_*_length before 6.3)
	{"6.12", []string{"kprobe", "fentry", "tracepoint"}},
}

// coreSocketTests are the integration tests run in each VM kernel in each
// of its modes (sockets.EnvTestMode), and the subtests each must pass.
var coreSocketTests = []string{
	"TestCurlNginx", "TestCurlNginx/ipv4", "TestCurlNginx/ipv6",
	"TestGoKeepAlive", "TestUntracedCgroupIgnored", "TestPortFilter",
	"TestServerClosesWithoutResponse", "TestKernelEvents",
	// The payload prefix changed while the programs run.
	"TestPayloadBytesLive",
	// OpenSSL uprobes: classic uprobes and the system calls' I/O fallback
	// before 6.3/6.6, uprobe_multi and sock_*_length after.
	"TestOpenSSLKernelEvents",
	// Kernel TLS on both ends, in every mode; the tls module loaded late.
	"TestKTLS", "TestKTLS/1.2", "TestKTLS/1.3", "TestKTLSModuleLoadedLater",
}

// guestModules are the kernel modules the core tests load in the guest:
// vmtest's defaults (tls among them) and AES-GCM for kernel TLS, which
// the kernel would otherwise ask modprobe for (gcm, ghash-generic, and
// ctr where it is not built in).
var guestModules = append(slices.Clone(vmtest.DefaultModules), "gcm", "ghash-generic", "ctr")

// guestPrograms are the host programs the core tests run in the guest:
// nginx and curl, iproute2's ip (`ip netns`), and bash (testbed's nginx
// readiness check uses its /dev/tcp).
var guestPrograms = []string{"nginx", "curl", "ip", "bash"}

var modeResultRE = regexp.MustCompile(`MODE-RESULT (\w+) (\[.*\])`)

func TestKernelMatrix(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("the matrix is run from the host")
	}
	testbed.RequireRoot(t)
	for _, p := range guestPrograms {
		testbed.RequireTool(t, p)
	}
	probesBin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/probes")
	socketsBin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/sockets")

	var core []string
	for _, name := range coreSocketTests {
		if !strings.Contains(name, "/") {
			core = append(core, name)
		}
	}
	corePattern := "^(" + strings.Join(core, "|") + ")$"

	// kernel/mode -> sessions
	all := map[string][]sessionKey{}
	for mode, keys := range runModeEquivalence(t) {
		all["host/"+mode] = keys
	}
	for _, km := range kernelMatrix {
		t.Run(km.series, func(t *testing.T) {
			k := vmtest.LoadKernel(t, km.series)
			env := map[string]string{"CLOVISOR_REQUIRE_MODES": strings.Join(km.modes, ","), "CI": "true"}
			res, runs := vmtest.RunGoTests(t, k, []vmtest.GoTestRun{
				{Name: "probes", Binary: probesBin, Pattern: "^(TestForcedModes|TestBadOptions)$"},
				{Name: "sockets", Binary: socketsBin, Pattern: "^(TestModeEquivalence|TestServerSessionFromEvents|TestRoleFromPayload|TestLostEventsBecomeGaps|TestGarbageIsCountedNotExported|TestTableIsBoundedAndExpires|TestReorderedEventIsDropped|TestIPv6MappedAddresses)$"},
			}, vmtest.Options{Env: env})
			found := 0
			for _, m := range modeResultRE.FindAllStringSubmatch(runs[1].Output, -1) {
				var keys []sessionKey
				if err := json.Unmarshal([]byte(m[2]), &keys); err != nil {
					t.Fatalf("guest result %q: %v", m[0], err)
				}
				all[km.series+"/"+m[1]] = keys
				found++
			}
			if want := len(km.modes); found < want {
				t.Errorf("%d modes reported results on %s, want at least %d:\n%s", found, km.series, want, runs[1].Output)
			}
			t.Logf("%s: booted in %v, ran in %v", k, res.GuestBoot, res.GuestRun)
		})
	}

	// The core socket tests, in each kernel in each mode: one boot per
	// kernel running the test binary once per mode. The VMs have 1 vCPU
	// (under TCG a 1-vCPU guest runs these tests a little faster than a
	// 2-vCPU one: no cross-CPU IPIs and RCU waits), so the two kernels'
	// VMs share the host's two cores side by side (vmtest's CPU slots).
	t.Run("core", func(t *testing.T) {
		for _, km := range kernelMatrix {
			t.Run(km.series, func(t *testing.T) {
				t.Parallel()
				k := vmtest.LoadKernel(t, km.series)
				var runs []vmtest.GoTestRun
				for _, mode := range km.modes {
					runs = append(runs, vmtest.GoTestRun{Name: mode, Binary: socketsBin, Pattern: corePattern,
						Env: map[string]string{sockets.EnvTestMode: mode}})
				}
				res, results := vmtest.RunGoTests(t, k, runs, vmtest.Options{
					Env:      map[string]string{"CI": "true"},
					Programs: guestPrograms,
					Modules:  guestModules,
					CPUs:     1,
					Timeout:  time.Duration(len(runs)) * 150 * time.Second,
				})
				for _, r := range results {
					t.Run(r.Name, func(t *testing.T) {
						for _, name := range coreSocketTests {
							if !regexp.MustCompile(`(?m)^\s*--- PASS: ` + regexp.QuoteMeta(name) + ` `).MatchString(r.Output) {
								t.Errorf("%s in %s mode on %s did not pass (failed, skipped or missing)", name, r.Name, k)
							}
						}
						t.Logf("%s, %s mode: core socket tests ran %v in the guest", k, r.Name, r.Duration.Round(time.Millisecond))
					})
				}
				t.Logf("%s: qemu ran %v (guest boot %v, tests %v)", k,
					res.Duration.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond), res.GuestRun.Round(time.Millisecond))
			})
		}
	})
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
