package tcsessions

import (
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestGeneratedObjectsMatchSources regenerates the BPF objects from
// bpf/tc.c with the pinned compiler and fails if any committed file
// differs.
func TestGeneratedObjectsMatchSources(t *testing.T) {
	testbed.CheckGenerated(t, "tcsessions")
}
