package probes

import (
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestGeneratedObjectsMatchSources regenerates the BPF objects from bpf/
// with the pinned compiler and fails if any committed file differs.
func TestGeneratedObjectsMatchSources(t *testing.T) {
	testbed.CheckGenerated(t, "probes")
}
