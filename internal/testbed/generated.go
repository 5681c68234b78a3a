package testbed

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// CheckGenerated regenerates the bpf2go objects of the package in folder
// pkg (relative to the repository root, e.g. "probes") from the C under
// bpf/ with the pinned compiler, in a copy of the module, and fails the
// test if any committed *_bpfel.* file differs, is missing or is no longer
// generated.
func CheckGenerated(t *testing.T, pkg string) {
	t.Helper()
	RequireTool(t, "clang-14")
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	for _, dir := range []string{"bpf", pkg} {
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
	generated, err := filepath.Glob(filepath.Join(root, pkg, "*_bpfel.*"))
	if err != nil || len(generated) == 0 {
		t.Fatalf("no generated files found in %s: %v", pkg, err)
	}
	// Remove the copies, so that a file no longer generated shows up.
	for _, g := range generated {
		os.Remove(filepath.Join(tmp, pkg, filepath.Base(g)))
	}
	cmd := exec.Command("go", "generate", "./"+pkg)
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go generate: %v\n%s", err, out)
	}
	fresh, _ := filepath.Glob(filepath.Join(tmp, pkg, "*_bpfel.*"))
	if len(fresh) != len(generated) {
		t.Errorf("generation made %d files, %d are committed", len(fresh), len(generated))
	}
	for _, g := range generated {
		want, _ := os.ReadFile(g)
		got, err := os.ReadFile(filepath.Join(tmp, pkg, filepath.Base(g)))
		if err != nil {
			t.Errorf("%s/%s was not generated: %v", pkg, filepath.Base(g), err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s/%s differs from what bpf/ generates: run `go generate ./%s` and commit", pkg, filepath.Base(g), pkg)
		}
	}
}
