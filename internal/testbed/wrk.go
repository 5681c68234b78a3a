package testbed

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// WrkResult is what wrk reports of one run.
type WrkResult struct {
	Requests int64
	PerSec   float64
	// Errors holds wrk's error lines ("Socket errors: ...", "Non-2xx or
	// 3xx responses: N"), joined by "; ", or is empty.
	Errors string
}

// ParseWrk reads wrk's summary: "N requests in 5.00s, ...", "Requests/sec:
// R", and the error lines.
func ParseWrk(out string) (WrkResult, error) {
	var r WrkResult
	found := 0
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.Contains(line, " requests in "):
			n, err := strconv.ParseInt(strings.Fields(line)[0], 10, 64)
			if err != nil {
				return r, fmt.Errorf("%q: %v", line, err)
			}
			r.Requests = n
			found++
		case strings.HasPrefix(line, "Requests/sec:"):
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, "Requests/sec:")), 64)
			if err != nil {
				return r, fmt.Errorf("%q: %v", line, err)
			}
			r.PerSec = v
			found++
		case strings.HasPrefix(line, "Socket errors:"), strings.HasPrefix(line, "Non-2xx"):
			r.Errors += line + "; "
		}
	}
	if found != 2 {
		return r, fmt.Errorf("no request count or rate in wrk's output")
	}
	return r, nil
}

// Wrk runs wrk (-t 2 -c 8, keep-alive) against url for d, in the client's
// namespace and cgroup, and fails the test on an error, a non-2xx answer
// or no request.
func (p *HTTPPair) Wrk(t testing.TB, d time.Duration, url string) WrkResult {
	t.Helper()
	wrk := RequireTool(t, "wrk")
	cmd, start := p.ClientCommand(context.Background(), wrk, "-t", "2", "-c", "8", "-d", fmt.Sprintf("%ds", int(d.Seconds())), url)
	var out strings.Builder
	cmd.Stdout = &out
	if err := start(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("wrk: %v\n%s", err, out.String())
	}
	r, err := ParseWrk(out.String())
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out.String())
	}
	if r.Errors != "" || r.Requests == 0 {
		t.Fatalf("wrk: %d requests, %s\n%s", r.Requests, r.Errors, out.String())
	}
	return r
}

// WrkFileBytes is the size of the file the wrk benchmarks fetch: 1024, or
// CLOVISOR_BENCH_FILE_BYTES (to see how a fixed per-request cost weighs on
// larger responses). A value that is not a positive number fails the
// benchmark.
func WrkFileBytes(t testing.TB) int {
	t.Helper()
	v := os.Getenv("CLOVISOR_BENCH_FILE_BYTES")
	if v == "" {
		return 1024
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("CLOVISOR_BENCH_FILE_BYTES=%q: want a positive number of bytes", v)
	}
	return n
}
