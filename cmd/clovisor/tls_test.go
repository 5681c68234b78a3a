package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestTLSConsole: the agent (TLS tracing on by default, per process with
// the cgroup filter) prints the HTTPS exchange between curl and nginx with
// its method, path and status, the TLS version and via=openssl, logs the
// library it probed with the processes it probed it in, and leaves no TLS
// program behind at exit.
func TestTLSConsole(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	p := testbed.NewTLSPair(t)
	p.WriteFile(t, "t.txt", []byte("tls\n"))
	a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}, cgroupFlag(p.HTTPPair))
	// curl through the exec wrapper: the agent probes the wrapper's
	// process (its log says so) before curl starts in it.
	const libssl3 = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
	self, args := testbed.ProbedArgs(t, "curl", "-sS", "--cacert", p.Cert.CertFile, "-o", "/dev/null", p.URL("/t.txt"))
	curl, start := p.ClientCommand(context.Background(), self, args...)
	var curlErr strings.Builder
	curl.Stderr = &curlErr
	probed := func(pid int) bool {
		for _, l := range strings.Split(a.stderr.String(), "\n") {
			if strings.Contains(l, `msg="TLS library probed"`) && strings.Contains(l, "libssl.so.3 ") &&
				strings.Contains(l, fmt.Sprintf(" pid=%d all_processes=false", pid)) {
				return true
			}
		}
		return false
	}
	if err := testbed.ProbedStart(t, curl, start, probed, libssl3)(); err != nil {
		t.Fatal(err)
	}
	if err := curl.Wait(); err != nil {
		t.Fatalf("curl: %v: %s", err, curlErr.String())
	}
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
	// nginx ran before the agent: its master and its worker were probed,
	// each on its own.
	nginxPIDs := append(strings.Fields(string(workers)), fmt.Sprint(p.Nginx.Cmd.Process.Pid))
	libssl, _ := filepath.EvalSymlinks("/usr/lib/x86_64-linux-gnu/libssl.so.3")
	log := a.stderr.String()
	for _, pid := range nginxPIDs {
		found := false
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, `msg="TLS library probed"`) && strings.Contains(l, "impl=openssl") &&
				(strings.Contains(l, "path="+libssl+" ") || strings.Contains(l, "path=/lib/x86_64-linux-gnu/libssl.so.3 ")) &&
				strings.HasSuffix(l, " pid="+pid+" all_processes=false") {
				found = true
			}
		}
		if !found {
			t.Errorf("log does not name libssl probed in nginx process %s:\n%s", pid, log)
		}
	}
	for _, msg := range []string{`msg="TLS tracing started" component=tls probes=process`, "TLS counters", "openssl_unbound=0"} {
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

// TestTLSProbesSetting: with a cgroup filter the uprobes are per process
// unless --tls-probes=file or tls.probes: file (the flag wins over the
// file); without a filter they are per file; a bad value in the file stops
// the agent with a message.
func TestTLSProbesSetting(t *testing.T) {
	testbed.RequireRoot(t)
	cg := "--cgroup=" + testbed.NewCgroup(t, "tlsprobes").Path()
	dir := t.TempDir()
	file, bad := filepath.Join(dir, "file.yaml"), filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(file, []byte("tls:\n  probes: file\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("tls:\n  probes: nowhere\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{cg}, "process"},
		{[]string{cg, "--tls-probes=file"}, "file"},
		{[]string{cg, "--config=" + file}, "file"},
		{[]string{cg, "--config=" + file, "--tls-probes=process"}, "process"},
		{[]string{"--port=1"}, "file"},
	} {
		a := startAgent(t, []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}, c.args...)
		a.stop(t)
		if want := `msg="TLS tracing started" component=tls probes=` + c.want + " "; !strings.Contains(a.stderr.String(), want) {
			t.Errorf("%v: log lacks %q:\n%s", c.args, want, a.stderr.String())
		}
	}
	out, err := exec.Command(agentBin, cg, "--config="+bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), `tls.probes in the configuration file: "nowhere": want process or file`) {
		t.Errorf("tls.probes: nowhere: exit %v, output %s", err, out)
	}
}
