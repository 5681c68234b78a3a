// Package gotlsdemo builds the Go programs the crypto/tls uprobe tests run
// and analyse: an HTTPS server and client (program/main.go) and a Go
// program without TLS, with the machine's Go or an older release fetched
// through the module proxy (a `go` toolchain download, GOTOOLCHAIN), plain,
// stripped, position-independent, externally linked, or for arm64.
//
// Binaries are kept in the test cache folder outside the checkout
// (${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-~/.cache}/clovisor-testbed}/gotls-demo/),
// named by a hash of the source, the toolchain's version and the build
// settings, so each is built once; the toolchains live in the Go module
// cache. Outside CI a toolchain that cannot be fetched skips the test;
// with CI=true it fails it.
package gotlsdemo

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

//go:embed program/main.go
var demoSource string

// DemoSource is the HTTPS server and client program.
func DemoSource() string { return demoSource }

// NoTLSSource is a Go program that links no crypto/tls.
const NoTLSSource = `package main

import "fmt"

func main() { fmt.Println("no TLS here") }
`

// OldGo is the older Go release the tests build with, fetched through
// the module proxy (golang.org/toolchain).
const OldGo = "go1.22.12"

// Variant is how a program is built.
type Variant struct {
	// Go is the toolchain: "" for the machine's, or a release such as
	// OldGo.
	Go string
	// Stripped builds with -trimpath -ldflags=-s -w (no .symtab, no
	// DWARF).
	Stripped bool
	// PIE builds a position-independent executable.
	PIE bool
	// External links with the system linker (cgo on, needs gcc).
	External bool
	// Arch is the GOARCH; "" for amd64.
	Arch string
}

// String names the variant in test names, e.g. "go1.22.12-stripped".
func (v Variant) String() string {
	s := v.Go
	if s == "" {
		s = "local"
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{v.Stripped, "stripped"}, {v.PIE, "pie"}, {v.External, "external"}, {v.Arch != "", v.Arch}} {
		if f.on {
			s += "-" + f.name
		}
	}
	return s
}

var (
	mu        sync.Mutex
	toolchain = map[string]string{} // Variant.Go -> `go version` output
)

// goVersion returns the toolchain's `go version`, fetching it if needed.
func goVersion(t testing.TB, release string) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if v, ok := toolchain[release]; ok {
		return v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "version")
	cmd.Env = goEnv(Variant{Go: release})
	cmd.Dir = os.TempDir()
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := fmt.Sprintf("gotlsdemo: Go toolchain %q through the module proxy: %v\n%s", release, err, out)
		if ci, _ := strconv.ParseBool(os.Getenv("CI")); ci {
			t.Fatalf("%s (CI=true: must not skip)", msg)
		}
		t.Skip(msg)
	}
	v := strings.TrimSpace(string(out))
	toolchain[release] = v
	return v
}

func goEnv(v Variant) []string {
	tc := v.Go
	if tc == "" {
		tc = "local"
	}
	arch := v.Arch
	if arch == "" {
		arch = "amd64"
	}
	cgo := "0"
	if v.External {
		cgo = "1"
	}
	return append(os.Environ(), "GOTOOLCHAIN="+tc, "GOWORK=off", "GOFLAGS=-buildvcs=false",
		"GOARCH="+arch, "GOOS=linux", "CGO_ENABLED="+cgo)
}

// EnvPrebuilt names a folder of binaries built beforehand, where Build
// takes <folder>/<name>/<variant>/prog instead of building (a VM guest has
// no Go toolchain); see GuestFiles.
const EnvPrebuilt = "CLOVISOR_GOTLS_PREBUILT"

// Build returns the path of source (a main package, one file) built as
// v, building it unless the cache has it.
func Build(t testing.TB, source string, v Variant) string {
	t.Helper()
	if dir := os.Getenv(EnvPrebuilt); dir != "" {
		bin := filepath.Join(dir, sourceName(source), v.String(), "prog")
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("gotlsdemo: %s=%s has no %s build: %v", EnvPrebuilt, dir, v, err)
		}
		return bin
	}
	gv := goVersion(t, v.Go)
	args := []string{"build", "-o", "prog"}
	ldflags := ""
	if v.Stripped {
		args = append(args, "-trimpath")
		ldflags = "-s -w"
	}
	if v.PIE {
		args = append(args, "-buildmode=pie")
	}
	if v.External {
		ldflags = strings.TrimSpace(ldflags + " -linkmode=external")
	}
	if ldflags != "" {
		args = append(args, "-ldflags="+ldflags)
	}
	args = append(args, "main.go")
	key := sha256.Sum256([]byte(strings.Join(append([]string{source, gv, v.String()}, args...), "\x00")))
	dir := filepath.Join(CacheDir(), "gotls-demo", v.String()+"-"+hex.EncodeToString(key[:8]))
	bin := filepath.Join(dir, "prog")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if v.External {
		if _, err := exec.LookPath("gcc"); err != nil {
			t.Fatalf("gotlsdemo: external linking needs gcc: %v", err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	// Build in a fresh folder and rename it into place: concurrent test
	// processes may build the same binary, and one of them wins.
	work, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(work)
	files := map[string]string{"main.go": source, "go.mod": "module demo\n\ngo 1.21\n"}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(work, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = work
	cmd.Env = goEnv(v)
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gotlsdemo: building %s: go %s: %v\n%s", v, strings.Join(args, " "), err, out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Logf("gotlsdemo: built %s in %v", v, d.Round(time.Second))
	}
	if err := os.Rename(work, dir); err != nil {
		if _, serr := os.Stat(bin); serr != nil {
			t.Fatalf("gotlsdemo: %v", err)
		}
	}
	pruneOld(filepath.Dir(dir), v.String()+"-", filepath.Base(dir))
	return bin
}

// pruneOld removes builds of the same variant from other sources (older
// versions of the program) that are more than a day old: a checkout
// testing another version at the same time keeps its build.
func pruneOld(parent, prefix, keep string) {
	ents, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || name == keep || !strings.HasPrefix(name, prefix) || len(name) != len(prefix)+16 {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > 24*time.Hour {
			os.RemoveAll(filepath.Join(parent, name))
		}
	}
}

// CacheDir is the test cache folder shared with scripts/.
func CacheDir() string {
	if d := os.Getenv("CLOVISOR_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "clovisor-testbed")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "clovisor-testbed")
	}
	return filepath.Join(os.TempDir(), "clovisor-testbed")
}

// sourceName names the programs in prebuilt folders.
func sourceName(source string) string {
	if source == NoTLSSource {
		return "notls"
	}
	return "demo"
}

// GuestFiles builds the demo program as each variant and returns the files
// for a VM guest (guest path -> host path) under the guest folder dir,
// which EnvPrebuilt should name in the guest.
func GuestFiles(t testing.TB, dir string, variants ...Variant) map[string]string {
	t.Helper()
	files := map[string]string{}
	for _, v := range variants {
		files[filepath.Join(dir, "demo", v.String(), "prog")] = Build(t, demoSource, v)
	}
	return files
}
