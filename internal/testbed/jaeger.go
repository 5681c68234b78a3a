package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// jaegerHealthTimeout bounds how long StartJaeger waits for Jaeger to become
// healthy after starting it.
const jaegerHealthTimeout = 30 * time.Second

// Jaeger is a Jaeger v2 process with in-memory storage, listening on
// 127.0.0.1 ports chosen at run time. Create it with StartJaeger.
type Jaeger struct {
	otlpGRPC  string // host:port
	otlpHTTP  string // host:port
	queryHTTP string // host:port
	queryGRPC string // host:port
	health    string // host:port
	dir       string
	cmd       *exec.Cmd
	exited    chan struct{}
	client    *http.Client
}

// Trace is one trace as Jaeger's /api/traces returns it.
type Trace struct {
	TraceID string
	Spans   []Span
}

// Span is one span of a Trace, with its process resolved.
type Span struct {
	TraceID       string      `json:"traceID"`
	SpanID        string      `json:"spanID"`
	OperationName string      `json:"operationName"`
	References    []Reference `json:"references"`
	StartTime     int64       `json:"startTime"` // microseconds since the Unix epoch
	Duration      int64       `json:"duration"`  // microseconds
	Tags          []Tag       `json:"tags"`
	ProcessID     string      `json:"processID"`
	Process       Process     `json:"-"`
}

// Reference links a span to another one (refType CHILD_OF or FOLLOWS_FROM).
type Reference struct {
	RefType string `json:"refType"`
	TraceID string `json:"traceID"`
	SpanID  string `json:"spanID"`
}

// Tag is a span or process attribute. Type is Jaeger's: string, bool, int64,
// float64 or binary. Value is a string, a bool, or a json.Number for numbers;
// Jaeger sends int64 values beyond ±(2^53-1) as decimal strings, so read
// integers with Int64.
type Tag struct {
	Key   string `json:"key"`
	Type  string `json:"type"`
	Value any    `json:"value"`
}

// String formats the tag's value as text ("42", "true", "GET").
func (g Tag) String() string { return fmt.Sprint(g.Value) }

// Int64 returns the value of an int64 tag, exactly, whether Jaeger sent it
// as a JSON number or (beyond ±(2^53-1)) as a string.
func (g Tag) Int64() (int64, error) {
	if g.Type != "int64" {
		return 0, fmt.Errorf("tag %s is of type %s, not int64", g.Key, g.Type)
	}
	return strconv.ParseInt(g.String(), 10, 64)
}

// Process is the emitting process of a span: its service.name and its other
// resource attributes.
type Process struct {
	ServiceName string `json:"serviceName"`
	Tags        []Tag  `json:"tags"`
}

// Tag returns the span tag named key.
func (s Span) Tag(key string) (Tag, bool) { return findTag(s.Tags, key) }

// Tag returns the process tag (resource attribute) named key.
func (p Process) Tag(key string) (Tag, bool) { return findTag(p.Tags, key) }

func findTag(tags []Tag, key string) (Tag, bool) {
	for _, g := range tags {
		if g.Key == key {
			return g, true
		}
	}
	return Tag{}, false
}

// StartJaeger builds (once, cached) and starts a Jaeger v2 with in-memory
// storage on free 127.0.0.1 ports, waits until it is healthy, and stops it
// when the test ends. Jaeger's own tracing is off
// (OTEL_TRACES_SAMPLER=always_off), so the store holds only what tests send.
func StartJaeger(t testing.TB) *Jaeger {
	t.Helper()
	bin := jaegerBinary(t)
	var lastErr error
	// Ports are picked free but not reserved; retry if one got taken.
	for attempt := 1; attempt <= 3; attempt++ {
		j, err := startJaeger(t, bin)
		if err == nil {
			return j
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
		t.Logf("StartJaeger: attempt %d: port taken, retrying", attempt)
	}
	t.Fatalf("StartJaeger: %v", lastErr)
	return nil
}

// jaegerBinary runs scripts/jaeger.sh, which prints the cached binary's path
// (building it first if needed).
func jaegerBinary(t testing.TB) string {
	t.Helper()
	return cachedBinary(t, "StartJaeger", "jaeger.sh")
}

// cachedBinary runs a build script of scripts/ that prints the path of a
// binary cached outside the checkout (building it once if needed), and
// returns that path; caller names the test helper in failures.
func cachedBinary(t testing.TB, caller, script string) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatalf("%s: %v", caller, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "scripts", script))
	cmd.Dir = root
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: scripts/%s: %v\n%s", caller, script, err, stderr.String())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Logf("%s: scripts/%s took %v", caller, script, d.Round(time.Second))
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	bin := strings.TrimSpace(lines[len(lines)-1])
	if fi, err := os.Stat(bin); err != nil || fi.IsDir() {
		t.Fatalf("%s: scripts/%s printed %q, not a binary (%v)\n%s", caller, script, bin, err, stderr.String())
	}
	return bin
}

const jaegerConfig = `extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: %[3]s
    grpc:
      endpoint: %[4]s
  healthcheckv2:
    use_v2: true
    http:
      endpoint: %[5]s
      status:
        enabled: true
        path: /status
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %[1]s
      http:
        endpoint: %[2]s
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
`

func startJaeger(t testing.TB, bin string) (*Jaeger, error) {
	t.Helper()
	addr := func() string { return "127.0.0.1:" + strconv.Itoa(FreePort(t)) }
	j := &Jaeger{
		otlpGRPC:  addr(),
		otlpHTTP:  addr(),
		queryHTTP: addr(),
		queryGRPC: addr(),
		health:    addr(),
		dir:       t.TempDir(),
		exited:    make(chan struct{}),
		client:    &http.Client{Timeout: 5 * time.Second},
	}
	cfg := filepath.Join(j.dir, "jaeger.yaml")
	yaml := fmt.Sprintf(jaegerConfig, j.otlpGRPC, j.otlpHTTP, j.queryHTTP, j.queryGRPC, j.health)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		return nil, err
	}
	logPath := filepath.Join(j.dir, "jaeger.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy

	j.cmd = exec.Command(bin, "--config", "file:"+cfg)
	j.cmd.Dir = j.dir
	j.cmd.Stdout = logf
	j.cmd.Stderr = logf
	j.cmd.Env = append(os.Environ(), "OTEL_TRACES_SAMPLER=always_off")
	// Die with the test binary even if it is killed before cleanup runs.
	j.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := j.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	var waitErr error
	go func() { waitErr = j.cmd.Wait(); close(j.exited) }()
	t.Cleanup(func() {
		j.stop()
		if t.Failed() {
			t.Logf("Jaeger log (tail):\n%s", tail(logPath, 4000))
		}
	})

	deadline := time.Now().Add(jaegerHealthTimeout)
	for {
		select {
		case <-j.exited:
			return nil, fmt.Errorf("jaeger exited before becoming healthy (%v); log tail:\n%s", waitErr, tail(logPath, 4000))
		default:
		}
		if j.healthy() {
			return j, nil
		}
		if time.Now().After(deadline) {
			j.stop()
			return nil, fmt.Errorf("jaeger not healthy at http://%s/status after %v; log tail:\n%s", j.health, jaegerHealthTimeout, tail(logPath, 4000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// healthy reports whether the health endpoint answers 200 and the query API
// and OTLP receivers accept connections.
func (j *Jaeger) healthy() bool {
	resp, err := j.client.Get("http://" + j.health + "/status")
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false
	}
	for _, a := range []string{j.queryHTTP, j.otlpGRPC, j.otlpHTTP} {
		if WaitTCP(a, 0) != nil {
			return false
		}
	}
	return true
}

// stop terminates Jaeger (SIGTERM, then SIGKILL after 10 s) and waits for it.
func (j *Jaeger) stop() {
	select {
	case <-j.exited:
		return
	default:
	}
	_ = j.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-j.exited:
	case <-time.After(10 * time.Second):
		_ = j.cmd.Process.Kill()
		<-j.exited
	}
}

// OTLPGRPCEndpoint returns the OTLP/gRPC receiver's host:port (no TLS).
func (j *Jaeger) OTLPGRPCEndpoint() string { return j.otlpGRPC }

// OTLPHTTPEndpoint returns the OTLP/HTTP receiver's base URL, http://host:port
// (traces go to /v1/traces).
func (j *Jaeger) OTLPHTTPEndpoint() string { return "http://" + j.otlpHTTP }

// QueryURL returns the base URL of Jaeger's query HTTP API, http://host:port.
func (j *Jaeger) QueryURL() string { return "http://" + j.queryHTTP }

// QueryGRPCEndpoint returns the host:port of Jaeger's query gRPC API.
func (j *Jaeger) QueryGRPCEndpoint() string { return j.queryGRPC }

// LogPath returns the path of the file holding Jaeger's output.
func (j *Jaeger) LogPath() string { return filepath.Join(j.dir, "jaeger.log") }

// getJSON GETs path from the query API and decodes the "data" member of the
// answer into data.
func (j *Jaeger) getJSON(path string, data any) error {
	resp, err := j.client.Get(j.QueryURL() + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode == http.StatusNotFound {
		return nil // no such service or trace yet
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	var env struct {
		Data   json.RawMessage `json:"data"`
		Errors []struct {
			Msg string `json:"msg"`
		} `json:"errors"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&env); err != nil {
		return fmt.Errorf("GET %s: decoding %q: %w", path, body, err)
	}
	if len(env.Errors) > 0 {
		return fmt.Errorf("GET %s: %s", path, env.Errors[0].Msg)
	}
	if len(env.Data) == 0 || string(env.Data) == "null" {
		return nil
	}
	dec = json.NewDecoder(bytes.NewReader(env.Data))
	dec.UseNumber()
	if err := dec.Decode(data); err != nil {
		return fmt.Errorf("GET %s: decoding data: %w", path, err)
	}
	return nil
}

// Services returns the service names Jaeger has spans of, sorted.
func (j *Jaeger) Services() ([]string, error) {
	var s []string
	if err := j.getJSON("/api/services", &s); err != nil {
		return nil, err
	}
	sort.Strings(s)
	return s, nil
}

// Traces returns the traces (up to 1000, newest first as Jaeger orders them)
// that have spans of service, with every span's Process filled in.
func (j *Jaeger) Traces(service string) ([]Trace, error) {
	var raw []struct {
		TraceID   string             `json:"traceID"`
		Spans     []Span             `json:"spans"`
		Processes map[string]Process `json:"processes"`
	}
	q := url.Values{"service": {service}, "limit": {"1000"}}
	if err := j.getJSON("/api/traces?"+q.Encode(), &raw); err != nil {
		return nil, err
	}
	traces := make([]Trace, 0, len(raw))
	for _, r := range raw {
		for i := range r.Spans {
			r.Spans[i].Process = r.Processes[r.Spans[i].ProcessID]
		}
		traces = append(traces, Trace{TraceID: r.TraceID, Spans: r.Spans})
	}
	return traces, nil
}

// Spans returns all spans of all traces of service whose process is service
// (traces can hold spans of other services too), ordered by start time.
func (j *Jaeger) Spans(service string) ([]Span, error) {
	traces, err := j.Traces(service)
	if err != nil {
		return nil, err
	}
	var spans []Span
	for _, tr := range traces {
		for _, s := range tr.Spans {
			if s.Process.ServiceName == service {
				spans = append(spans, s)
			}
		}
	}
	sort.SliceStable(spans, func(a, b int) bool { return spans[a].StartTime < spans[b].StartTime })
	return spans, nil
}

// WaitForSpans polls Jaeger until it holds at least n spans of service and
// returns them all (ordered by start time). On timeout it fails the test,
// listing what it did find.
func (j *Jaeger) WaitForSpans(t testing.TB, service string, n int, timeout time.Duration) []Span {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var (
		spans []Span
		err   error
	)
	for {
		spans, err = j.Spans(service)
		if err == nil && len(spans) >= n {
			return spans
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	services, serr := j.Services()
	var b strings.Builder
	fmt.Fprintf(&b, "WaitForSpans: want >= %d spans of service %q within %v, found %d", n, service, timeout, len(spans))
	if err != nil {
		fmt.Fprintf(&b, " (last query error: %v)", err)
	}
	for _, s := range spans {
		fmt.Fprintf(&b, "\n  %s/%s %q tags=%v", s.TraceID, s.SpanID, s.OperationName, s.Tags)
	}
	fmt.Fprintf(&b, "\n  services in Jaeger: %v (err %v)", services, serr)
	t.Fatal(b.String())
	return nil
}
