package podmap_test

import (
	"path/filepath"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/podmap"
)

func TestCgroupResolver(t *testing.T) {
	testbed.RequireRoot(t)
	cg := testbed.NewCgroup(t, "resolve")
	r, err := podmap.NewCgroupResolver()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	mount, err := testbed.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if r.Mount() != mount {
		t.Errorf("mount %q, want %q", r.Mount(), mount)
	}
	id, err := podmap.CgroupID(filepath.Join(mount, cg.Path()))
	if err != nil || id != cg.ID() {
		t.Fatalf("CgroupID = %d, %v; want %d", id, err, cg.ID())
	}
	if got := r.Path(cg.ID()); got != cg.Path() {
		t.Errorf("Path(%d) = %q, want %q", cg.ID(), got, cg.Path())
	}
	rootID, _ := podmap.CgroupID(mount)
	if got := r.Path(rootID); got != "/" {
		t.Errorf("root: %q", got)
	}
	// Unknown ids resolve to nothing (not an error, not a stale path).
	if got := r.Path(1 << 62); got != "" {
		t.Errorf("unknown id resolved to %q", got)
	}
	if got := r.Path(0); got != "" {
		t.Errorf("id 0 resolved to %q", got)
	}
}
