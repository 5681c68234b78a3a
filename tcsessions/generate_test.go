package tcsessions

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestGeneratedObjectsMatchSources regenerates the BPF objects from
// bpf/tc.c with the pinned compiler in a copy of the module and fails if any
// committed file differs.
func TestGeneratedObjectsMatchSources(t *testing.T) {
	testbed.RequireTool(t, "clang-14")
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, dir := range []string{"bpf", "tcsessions"} {
		if out, err := exec.Command("cp", "-a", filepath.Join(root, dir), filepath.Join(tmp, dir)).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v %s", dir, err, out)
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		data, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tmp, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	generated, err := filepath.Glob(filepath.Join(root, "tcsessions", "*_bpfel.*"))
	if err != nil || len(generated) == 0 {
		t.Fatalf("no generated files found: %v", err)
	}
	// Remove the copies so that a file no longer generated shows up.
	for _, g := range generated {
		os.Remove(filepath.Join(tmp, "tcsessions", filepath.Base(g)))
	}
	cmd := exec.Command("go", "generate", "./tcsessions")
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go generate: %v\n%s", err, out)
	}
	fresh, _ := filepath.Glob(filepath.Join(tmp, "tcsessions", "*_bpfel.*"))
	if len(fresh) != len(generated) {
		t.Errorf("generation made %d files, %d are committed", len(fresh), len(generated))
	}
	for _, g := range generated {
		want, _ := os.ReadFile(g)
		got, err := os.ReadFile(filepath.Join(tmp, "tcsessions", filepath.Base(g)))
		if err != nil {
			t.Errorf("%s was not generated: %v", filepath.Base(g), err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from what bpf/ generates: run `go generate ./tcsessions` and commit", strings.TrimPrefix(g, root+"/"))
		}
	}
}
