package vmtest

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// Kernel is a Debian kernel package unpacked by scripts/vmkernel.sh.
type Kernel struct {
	// Series is the kernel series it was asked for, e.g. "6.1".
	Series string
	// Version is the kernel release, what `uname -r` says in the guest,
	// e.g. "6.1.0-56-cloud-amd64".
	Version string
	// Dir is the cache folder holding vmlinuz, modules/ and kernel.env.
	Dir string
	// Package and PackageVersion name the exact Debian package, e.g.
	// "linux-image-6.1.0-56-cloud-amd64-unsigned" and "6.1.192-2".
	Package, PackageVersion string
}

// String returns e.g. "6.1 (6.1.0-56-cloud-amd64)".
func (k Kernel) String() string { return fmt.Sprintf("%s (%s)", k.Series, k.Version) }

// Vmlinuz is the path of the kernel image.
func (k Kernel) Vmlinuz() string { return filepath.Join(k.Dir, "vmlinuz") }

// ModulesDir is the kernel's lib/modules/<release> folder (with modules.dep).
func (k Kernel) ModulesDir() string { return filepath.Join(k.Dir, "modules") }

// DefaultSeries is the kernel series most VM tests boot: the oldest one
// Clovisor supports, where kprobes and fentry work but tcx does not.
const DefaultSeries = "6.1"

// LoadKernel returns the kernel of series (e.g. "6.1", "6.12"), running
// scripts/vmkernel.sh to download and unpack it into the cache on first use
// (a few seconds; later calls take milliseconds). It fails the test when the
// script fails, e.g. because the pinned package left the archive.
func LoadKernel(t testing.TB, series string) Kernel {
	t.Helper()
	testbed.RequireTool(t, "bash")
	k, err := loadKernel(series)
	if err != nil {
		t.Fatalf("vmtest: kernel %s: %v", series, err)
	}
	return k
}

// Kernels returns every kernel series scripts/vmkernel.sh supports, oldest
// first, downloading the ones not cached yet.
func Kernels(t testing.TB) []Kernel {
	t.Helper()
	testbed.RequireTool(t, "bash")
	script, err := scriptPath()
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	out, err := exec.Command("bash", script, "--list").Output()
	if err != nil {
		t.Fatalf("vmtest: %s --list: %v", script, err)
	}
	var ks []Kernel
	for _, s := range strings.Fields(string(out)) {
		ks = append(ks, LoadKernel(t, s))
	}
	return ks
}

// scriptPath finds scripts/vmkernel.sh in the checkout.
func scriptPath() (string, error) {
	root, err := testbed.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "scripts", "vmkernel.sh"), nil
}

// loadKernel runs scripts/vmkernel.sh for series and reads the kernel.env it
// leaves in the cache folder.
func loadKernel(series string) (Kernel, error) {
	script, err := scriptPath()
	if err != nil {
		return Kernel{}, err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("bash", script, series)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return Kernel{}, fmt.Errorf("%s %s: %v\n%s", script, series, err, stderr.String())
	}
	dir := strings.TrimSpace(stdout.String())
	if i := strings.LastIndexByte(dir, '\n'); i >= 0 {
		dir = dir[i+1:]
	}
	k, err := readKernelEnv(dir)
	if err != nil {
		return Kernel{}, err
	}
	if k.Series != series {
		return Kernel{}, fmt.Errorf("%s/kernel.env is of series %q, not %q", dir, k.Series, series)
	}
	return k, nil
}

// readKernelEnv parses dir/kernel.env (KEY='value' lines) into a Kernel.
func readKernelEnv(dir string) (Kernel, error) {
	f, err := os.Open(filepath.Join(dir, "kernel.env"))
	if err != nil {
		return Kernel{}, err
	}
	defer f.Close()
	k := Kernel{Dir: dir}
	s := bufio.NewScanner(f)
	for s.Scan() {
		key, val, ok := strings.Cut(s.Text(), "=")
		if !ok {
			continue
		}
		val = strings.Trim(val, "'")
		switch key {
		case "SERIES":
			k.Series = val
		case "RELEASE":
			k.Version = val
		case "PACKAGE":
			k.Package = val
		case "PKG_VERSION":
			k.PackageVersion = val
		}
	}
	if err := s.Err(); err != nil {
		return Kernel{}, err
	}
	if k.Series == "" || k.Version == "" {
		return Kernel{}, fmt.Errorf("%s/kernel.env lacks SERIES or RELEASE", dir)
	}
	for _, p := range []string{k.Vmlinuz(), filepath.Join(k.ModulesDir(), "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return Kernel{}, fmt.Errorf("incomplete kernel folder: %v", err)
		}
	}
	return k, nil
}
