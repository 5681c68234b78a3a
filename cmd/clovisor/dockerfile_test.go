package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDockerfileBuildsStaticBinary runs the Go build step of the Dockerfile
// (no Docker engine is needed for that part) and checks what the final,
// distroless "static" image relies on: the binary has no ELF interpreter
// and no shared libraries, and it starts (--help). Building the image
// itself needs a Docker engine, which the test machines do not have.
func TestDockerfileBuildsStaticBinary(t *testing.T) {
	raw, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 GOARCH=\$\{TARGETARCH:-amd64\} go build .*) -o /out/clovisor (\./cmd/clovisor)$`).FindStringSubmatch(string(raw))
	if m == nil {
		t.Fatal("Dockerfile: no `RUN CGO_ENABLED=0 GOARCH=${TARGETARCH:-amd64} go build ... -o /out/clovisor ./cmd/clovisor` step")
	}
	out := filepath.Join(t.TempDir(), "clovisor")
	// The step as the Dockerfile's RUN runs it (/bin/sh -c), from the
	// module root, writing to a temporary file instead of /out.
	cmd := exec.Command("/bin/sh", "-c", m[1]+` -o "$OUT" `+m[2])
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "OUT="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", m[1], err, b)
	}
	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("the image's binary has an ELF interpreter: it would not run in a static image")
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) != 0 {
		t.Errorf("the image's binary needs shared libraries %v (%v)", libs, err)
	}
	if f.Section(".symtab") != nil {
		t.Errorf("-ldflags='-s -w' left a symbol table")
	}
	if b, err := exec.Command(out, "--help").CombinedOutput(); err != nil || !strings.Contains(string(b), "-payload-bytes") {
		t.Errorf("the image's binary --help: %v\n%s", err, b)
	}
}
