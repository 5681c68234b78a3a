package sockets

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/probes"
)

// EnvTestMode names the attach mode the integration tests (curl, nginx and
// Go clients between network namespaces) trace in: one of probes.Modes,
// tracepoint when unset (the only mode the build machine's kernel has).
// The kernel matrix (kernels_test.go) runs them in the VM kernels once per
// mode.
const EnvTestMode = "CLOVISOR_TEST_MODE"

// AttachModeUnderTest returns the attach mode chosen by CLOVISOR_TEST_MODE; an
// unknown mode fails the test.
func AttachModeUnderTest(t testing.TB) string {
	t.Helper()
	m := os.Getenv(EnvTestMode)
	if m == "" {
		return probes.ModeTracepoint
	}
	if !slices.Contains(probes.Modes, m) {
		t.Fatalf("%s=%q: want one of %s", EnvTestMode, m, strings.Join(probes.Modes, ", "))
	}
	return m
}
