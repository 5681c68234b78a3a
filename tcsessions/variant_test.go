package tcsessions

import (
	"maps"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/clovisor/clovisor/probes"
)

// TestProgramVariant checks which programs a kernel gets (inlineKernel)
// and that this kernel got them: before 6.4 a program for each hook with
// every function inlined (tcInline, one JITed image per program), from 6.4
// on one program for both hooks with the rare paths in BPF subprograms
// (tc, one image per function). In the VM matrix it runs
// on 6.1 (inlined) and 6.12 (subprograms); on the host, 6.18. It also
// bounds the load's time: the out-of-line programs on 6.1 took minutes.
func TestProgramVariant(t *testing.T) {
	for release, want := range map[string]bool{
		"6.1.0-56-cloud-amd64":       true,
		"5.15.0-91-generic":          true,
		"4.19.0":                     true,
		"6.3.13":                     true,
		"6.4.0":                      false,
		"6.12.117+deb12-cloud-amd64": false,
		"6.18.44-fc-v1252":           false,
		"7.0.1":                      false,
		"":                           true,
		"linux":                      true,
	} {
		if got := inlineKernel(release); got != want {
			t.Errorf("inlineKernel(%q) = %v, want %v", release, got, want)
		}
	}

	cfg := Config{}
	if err := cfg.normalize(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	h := newHarness(t, cfg, 0)
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("loading the programs took %v", d)
	}
	inline := inlineVariant()
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err == nil && inline != inlineKernel(probes.KernelRelease()) {
		t.Errorf("a kernel with BTF: inlineVariant %v, want inlineKernel's %v", inline, !inline)
	}
	progs := h.o.programs()
	if want := map[bool][]string{true: {"clv_tc_egress", "clv_tc_ingress"}, false: {"clv_tc"}}[inline]; !slices.Equal(slices.Sorted(maps.Keys(progs)), want) {
		t.Errorf("programs %v, want %v", slices.Sorted(maps.Keys(progs)), want)
	}
	if (h.o.Ingress == h.o.Egress) == inline {
		t.Errorf("the hooks' programs are the same one: %v, want %v", h.o.Ingress == h.o.Egress, !inline)
	}
	for name, prog := range progs {
		info, err := prog.Info()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		lens, ok := info.JitedFuncLens()
		if !ok {
			t.Fatalf("%s: the kernel gives no JITed function lengths", name)
		}
		if inline && len(lens) != 1 {
			t.Errorf("%s on Linux %s: %d JITed functions, want 1 (every function inlined)", name, probes.KernelRelease(), len(lens))
		}
		if !inline && len(lens) < 2 {
			t.Errorf("%s on Linux %s: %d JITed functions, want the program and its subprograms", name, probes.KernelRelease(), len(lens))
		}
		t.Logf("%s on Linux %s: JITed functions of %v bytes", name, probes.KernelRelease(), lens)
	}
}
