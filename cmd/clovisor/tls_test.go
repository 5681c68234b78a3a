package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestTLSConsole: the agent (TLS tracing on by default) prints the HTTPS
// exchange between curl and nginx with its method, path and status, the
// TLS version and via=openssl, logs the library it probed with the
// process that revealed it, and leaves no TLS program behind at exit.
func TestTLSConsole(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	p := testbed.NewTLSPair(t)
	p.WriteFile(t, "t.txt", []byte("tls\n"))
	a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}, cgroupFlag(p.HTTPPair))
	p.Client(t, nil, "curl", "-sS", "--cacert", p.Cert.CertFile, "-o", "/dev/null", p.URL("/t.txt"))
	waitFor(t, func() bool { return strings.Count(a.stdout.String(), "\n") >= 2 }, a)
	a.stop(t)
	out := a.stdout.String()
	for _, w := range []string{"curl[", "nginx["} {
		found := false
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(strings.Fields(l + " x x")[1], w) && strings.Contains(l, "GET /t.txt 200") &&
				strings.Contains(l, "-> "+p.ServerIP.String()+":8443") && strings.Contains(l, " tls1.3 via=openssl") {
				found = true
			}
		}
		if !found {
			t.Errorf("no %s line with GET /t.txt 200 tls1.3 via=openssl:\n%s", w, out)
		}
	}
	workers, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p.Nginx.Cmd.Process.Pid, p.Nginx.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// nginx ran before the agent: its worker (or master) revealed libssl.
	revealers := append(strings.Fields(string(workers)), fmt.Sprint(p.Nginx.Cmd.Process.Pid))
	libssl, _ := filepath.EvalSymlinks("/usr/lib/x86_64-linux-gnu/libssl.so.3")
	log := a.stderr.String()
	probed := false
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="TLS library probed"`) && strings.Contains(l, "impl=openssl") &&
			(strings.Contains(l, "path="+libssl+" ") || strings.Contains(l, "path=/lib/x86_64-linux-gnu/libssl.so.3 ")) {
			for _, pid := range revealers {
				probed = probed || strings.HasSuffix(l, " pid="+pid)
			}
		}
	}
	if !probed {
		t.Errorf("log does not name the probed libssl:\n%s", log)
	}
	for _, msg := range []string{"TLS tracing started", "TLS counters", "openssl_unbound=0"} {
		if !strings.Contains(log, msg) {
			t.Errorf("log lacks %q:\n%s", msg, log)
		}
	}
}

// TestTLSDisabled: --tls=false, and tls.enabled: false in the
// configuration file, start no TLS tracing; the flag wins over the file.
func TestTLSDisabled(t *testing.T) {
	testbed.RequireRoot(t)
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(cfg, []byte("tls:\n  enabled: false\n  rescan: 10s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		on   bool
	}{
		{[]string{"--tls=false"}, false},
		{[]string{"--config=" + cfg}, false},
		{[]string{"--config=" + cfg, "--tls=true"}, true},
	} {
		a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}, append(c.args, "--port=1")...)
		a.stop(t)
		if got := strings.Contains(a.stderr.String(), "TLS tracing started"); got != c.on {
			t.Errorf("%v: TLS tracing started %v, want %v:\n%s", c.args, got, c.on, a.stderr.String())
		}
	}
}
